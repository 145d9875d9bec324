//! SLSA Provenance v1 predicates (<https://slsa.dev/spec/v1.0/provenance>)
//! from the detected CI environment, for `keybroker attest --provenance`.
//!
//! ```text
//! buildDefinition.buildType            one URI per CI system (docs/PROVENANCE.md)
//! buildDefinition.externalParameters   repository, ref, workflow / pipeline / job
//! buildDefinition.internalParameters   non-secret CI facts (event, runner, ...)
//! buildDefinition.resolvedDependencies the source: {"uri": "git+REPO@REF", "digest": {"gitCommit": SHA}}
//! runDetails.builder.id                the CI's runner; the broker may replace it
//!                                      with the authenticated caller
//! runDetails.metadata                  invocationId, startedOn (when known), finishedOn
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::ci_env::CiInfo;

/// The SLSA v1 predicate for a build described by `ci`, finished at `finished_on`.
pub fn slsa_v1(ci: &CiInfo, finished_on: &str) -> Value {
    let mut external = Map::new();
    external.insert("repository".into(), ci.repository.clone().into());
    if let Some(r) = &ci.git_ref {
        external.insert("ref".into(), r.clone().into());
    }
    if let Some(w) = &ci.workflow {
        let key = match ci.system {
            crate::ci_env::CiSystem::Jenkins => "job",
            _ => "workflow",
        };
        external.insert(key.into(), w.clone().into());
    }
    if let Some(p) = &ci.pipeline {
        external.insert("pipeline".into(), p.clone().into());
    }
    let source_uri = match &ci.git_ref {
        Some(r) => format!("git+{}@{r}", ci.repository),
        None => format!("git+{}", ci.repository),
    };
    let mut build_definition = json!({
        "buildType": ci.system.build_type(),
        "externalParameters": external,
        "resolvedDependencies": [{
            "uri": source_uri,
            "digest": { "gitCommit": ci.commit },
        }],
    });
    if !ci.internal.is_empty() {
        build_definition["internalParameters"] = json!({ ci.system.name(): ci.internal });
    }
    let mut metadata = Map::new();
    if let Some(id) = &ci.invocation_id {
        metadata.insert("invocationId".into(), id.clone().into());
    }
    if let Some(s) = &ci.started_on {
        metadata.insert("startedOn".into(), s.clone().into());
    }
    metadata.insert("finishedOn".into(), finished_on.into());
    json!({
        "buildDefinition": build_definition,
        "runDetails": {
            "builder": {
                "id": ci.builder_id,
                "version": { "keybroker": env!("CARGO_PKG_VERSION") },
            },
            "metadata": metadata,
        },
    })
}

/// `t` as RFC 3339 UTC with whole seconds (`2026-11-25T09:30:00Z`), as Go's
/// `time.RFC3339` prints a UTC time.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Now, as [`rfc3339`].
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ci_env::{detect, Env};
    use std::{path::Path, time::Duration};

    #[test]
    fn rfc3339_dates() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(at(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn github_provenance_has_every_required_part() {
        let env: Env = [
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_REPOSITORY", "acme/app"),
            ("GITHUB_SHA", "0123456789abcdef0123456789abcdef01234567"),
            ("GITHUB_REF", "refs/tags/v1"),
            (
                "GITHUB_WORKFLOW_REF",
                "acme/app/.github/workflows/r.yml@refs/tags/v1",
            ),
            ("GITHUB_RUN_ID", "5"),
            ("GITHUB_EVENT_NAME", "push"),
            ("KEYBROKER_BUILD_STARTED_ON", "2026-11-25T09:00:00Z"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let ci = detect(&env, Path::new("/nonexistent")).unwrap();
        let p = slsa_v1(&ci, "2026-11-25T09:10:00Z");
        let bd = &p["buildDefinition"];
        assert_eq!(
            bd["buildType"],
            "https://keybroker.dev/buildtypes/github-actions/v1"
        );
        assert_eq!(
            bd["externalParameters"],
            json!({
                "repository": "https://github.com/acme/app",
                "ref": "refs/tags/v1",
                "workflow": "acme/app/.github/workflows/r.yml@refs/tags/v1",
            })
        );
        assert_eq!(
            bd["resolvedDependencies"],
            json!([{
                "uri": "git+https://github.com/acme/app@refs/tags/v1",
                "digest": {"gitCommit": "0123456789abcdef0123456789abcdef01234567"},
            }])
        );
        assert_eq!(
            bd["internalParameters"]["github-actions"]["event_name"],
            "push"
        );
        let rd = &p["runDetails"];
        assert_eq!(
            rd["builder"]["id"],
            "https://github.com/actions/runner/github-hosted"
        );
        assert_eq!(
            rd["metadata"],
            json!({
                "invocationId": "https://github.com/acme/app/actions/runs/5/attempts/1",
                "startedOn": "2026-11-25T09:00:00Z",
                "finishedOn": "2026-11-25T09:10:00Z",
            })
        );
    }
}
