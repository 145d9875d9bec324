//! Where this build runs: GitHub Actions, GitLab CI, Jenkins, or a plain git
//! checkout. Read from an environment map (never the process environment
//! directly, so tests feed fixtures) and, for a plain checkout, from `git`.
//!
//! Used by `keybroker attest --provenance` (SLSA provenance, `provenance.rs`)
//! and `keybroker sign --ci-annotations`. Nothing secret is taken: GitLab's
//! `CI_REPOSITORY_URL` (which carries a job token) is never read, and user
//! info is stripped from every remote URL.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    process::Command,
};

use crate::Error;

/// The CI system detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CiSystem {
    /// `GITHUB_ACTIONS=true`.
    GitHubActions,
    /// `GITLAB_CI=true`.
    GitLabCi,
    /// `JENKINS_URL` or `BUILD_URL` with `GIT_COMMIT`.
    Jenkins,
    /// None of those: the git checkout in the working directory.
    Git,
}

impl CiSystem {
    /// Short name, as printed and used in the build type.
    pub fn name(self) -> &'static str {
        match self {
            CiSystem::GitHubActions => "github-actions",
            CiSystem::GitLabCi => "gitlab-ci",
            CiSystem::Jenkins => "jenkins",
            CiSystem::Git => "git",
        }
    }

    /// The SLSA `buildType` keybroker writes for builds on this system
    /// (documented in docs/PROVENANCE.md).
    pub fn build_type(self) -> &'static str {
        match self {
            CiSystem::GitHubActions => "https://keybroker.dev/buildtypes/github-actions/v1",
            CiSystem::GitLabCi => "https://keybroker.dev/buildtypes/gitlab-ci/v1",
            CiSystem::Jenkins => "https://keybroker.dev/buildtypes/jenkins/v1",
            CiSystem::Git => "https://keybroker.dev/buildtypes/git-checkout/v1",
        }
    }
}

/// What the CI environment says about this build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiInfo {
    /// The CI system.
    pub system: CiSystem,
    /// Source repository as an https (or other non-credential) URL, no `.git`.
    pub repository: String,
    /// The commit built (40 hex for SHA-1 repositories).
    pub commit: String,
    /// Full git ref (`refs/heads/main`, `refs/tags/v1`, `refs/pull/1/merge`), if known.
    pub git_ref: Option<String>,
    /// Branch name, when a branch was built.
    pub branch: Option<String>,
    /// Tag name, when a tag was built.
    pub tag: Option<String>,
    /// The workflow / pipeline definition that ran (GitHub `GITHUB_WORKFLOW_REF`,
    /// GitLab `CI_CONFIG_PATH`, Jenkins `JOB_NAME`).
    pub workflow: Option<String>,
    /// The pipeline (GitLab `CI_PIPELINE_URL`), where there is one apart from the job.
    pub pipeline: Option<String>,
    /// URL of this run / job.
    pub build_url: Option<String>,
    /// Identifier of this run, unique per attempt (a URL where the CI has one).
    pub invocation_id: Option<String>,
    /// Who ran it, as the CI names it (a URI); the broker may replace it with
    /// the authenticated caller.
    pub builder_id: String,
    /// When the job started (RFC 3339), if the CI says.
    pub started_on: Option<String>,
    /// Further CI-specific facts for `internalParameters` (non-secret).
    pub internal: BTreeMap<String, String>,
}

/// The environment as a map (what `detect` reads).
pub type Env = HashMap<String, String>;

/// The process environment as an [`Env`].
pub fn process_env() -> Env {
    std::env::vars().collect()
}

fn get<'a>(env: &'a Env, k: &str) -> Option<&'a str> {
    env.get(k).map(String::as_str).filter(|v| !v.is_empty())
}

fn need<'a>(env: &'a Env, system: &str, k: &str) -> Result<&'a str, Error> {
    get(env, k).ok_or_else(|| {
        Error::Other(format!(
            "{system} detected but {k} is not set; cannot describe the build"
        ))
    })
}

/// Detects the CI system from `env`, or falls back to the git checkout in
/// `dir` (running `git`). `KEYBROKER_BUILD_STARTED_ON` (RFC 3339) overrides the
/// start time for every system.
pub fn detect(env: &Env, dir: &Path) -> Result<CiInfo, Error> {
    let mut info = if get(env, "GITHUB_ACTIONS") == Some("true") {
        github(env)?
    } else if get(env, "GITLAB_CI") == Some("true") {
        gitlab(env)?
    } else if get(env, "GIT_COMMIT").is_some()
        && (get(env, "JENKINS_URL").is_some() || get(env, "BUILD_URL").is_some())
    {
        jenkins(env)?
    } else {
        git_checkout(env, dir)?
    };
    if let Some(t) = get(env, "KEYBROKER_BUILD_STARTED_ON") {
        info.started_on = Some(t.to_string());
    }
    Ok(info)
}

/// Splits a full ref into (branch, tag).
fn ref_names(git_ref: &str) -> (Option<String>, Option<String>) {
    if let Some(b) = git_ref.strip_prefix("refs/heads/") {
        (Some(b.to_string()), None)
    } else if let Some(t) = git_ref.strip_prefix("refs/tags/") {
        (None, Some(t.to_string()))
    } else {
        (None, None)
    }
}

fn github(env: &Env) -> Result<CiInfo, Error> {
    const S: &str = "GitHub Actions";
    let server = get(env, "GITHUB_SERVER_URL")
        .unwrap_or("https://github.com")
        .trim_end_matches('/');
    let repo = need(env, S, "GITHUB_REPOSITORY")?;
    let commit = need(env, S, "GITHUB_SHA")?;
    let git_ref = get(env, "GITHUB_REF").map(String::from);
    let (branch, tag) = git_ref.as_deref().map(ref_names).unwrap_or_default();
    let run_url = get(env, "GITHUB_RUN_ID").map(|id| {
        format!(
            "{server}/{repo}/actions/runs/{id}/attempts/{}",
            get(env, "GITHUB_RUN_ATTEMPT").unwrap_or("1")
        )
    });
    let runner = get(env, "RUNNER_ENVIRONMENT").unwrap_or("github-hosted");
    let mut internal = BTreeMap::new();
    for (k, name) in [
        ("GITHUB_EVENT_NAME", "event_name"),
        ("GITHUB_REPOSITORY_ID", "repository_id"),
        ("GITHUB_REPOSITORY_OWNER_ID", "repository_owner_id"),
        ("RUNNER_ENVIRONMENT", "runner_environment"),
        ("GITHUB_JOB", "job"),
    ] {
        if let Some(v) = get(env, k) {
            internal.insert(name.to_string(), v.to_string());
        }
    }
    Ok(CiInfo {
        system: CiSystem::GitHubActions,
        repository: format!("{server}/{repo}"),
        commit: commit.to_string(),
        git_ref,
        branch,
        tag,
        workflow: get(env, "GITHUB_WORKFLOW_REF").map(String::from),
        pipeline: None,
        build_url: run_url.clone(),
        invocation_id: run_url,
        // As GitHub's own provenance names the runner that built.
        builder_id: format!("https://github.com/actions/runner/{runner}"),
        started_on: None,
        internal,
    })
}

fn gitlab(env: &Env) -> Result<CiInfo, Error> {
    const S: &str = "GitLab CI";
    let project_url = need(env, S, "CI_PROJECT_URL")?.trim_end_matches('/');
    let commit = need(env, S, "CI_COMMIT_SHA")?;
    let tag = get(env, "CI_COMMIT_TAG").map(String::from);
    let branch = match &tag {
        Some(_) => None,
        None => get(env, "CI_COMMIT_BRANCH")
            .or_else(|| get(env, "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME"))
            .or_else(|| get(env, "CI_COMMIT_REF_NAME"))
            .map(String::from),
    };
    let git_ref = match (&tag, &branch) {
        (Some(t), _) => Some(format!("refs/tags/{t}")),
        (None, Some(b)) => Some(format!("refs/heads/{b}")),
        _ => None,
    };
    let server = get(env, "CI_SERVER_URL")
        .unwrap_or("https://gitlab.com")
        .trim_end_matches('/');
    let builder_id = match (get(env, "CI_PROJECT_PATH"), get(env, "CI_RUNNER_ID")) {
        // As GitLab's runner provenance names it.
        (Some(p), Some(r)) => format!("{server}/{p}/-/runners/{r}"),
        _ => format!("{server}/gitlab-runner"),
    };
    let mut internal = BTreeMap::new();
    for (k, name) in [
        ("CI_PIPELINE_SOURCE", "pipeline_source"),
        ("CI_PROJECT_ID", "project_id"),
        ("CI_JOB_NAME", "job_name"),
        ("CI_RUNNER_DESCRIPTION", "runner_description"),
    ] {
        if let Some(v) = get(env, k) {
            internal.insert(name.to_string(), v.to_string());
        }
    }
    Ok(CiInfo {
        system: CiSystem::GitLabCi,
        repository: project_url.to_string(),
        commit: commit.to_string(),
        git_ref,
        branch,
        tag,
        workflow: Some(
            get(env, "CI_CONFIG_PATH")
                .unwrap_or(".gitlab-ci.yml")
                .to_string(),
        ),
        pipeline: get(env, "CI_PIPELINE_URL").map(String::from),
        build_url: get(env, "CI_JOB_URL").map(String::from),
        invocation_id: get(env, "CI_JOB_URL")
            .map(String::from)
            .or_else(|| get(env, "CI_JOB_ID").map(|id| format!("{project_url}/-/jobs/{id}"))),
        builder_id,
        started_on: get(env, "CI_JOB_STARTED_AT").map(String::from),
        internal,
    })
}

fn jenkins(env: &Env) -> Result<CiInfo, Error> {
    const S: &str = "Jenkins";
    let commit = need(env, S, "GIT_COMMIT")?;
    let url = need(env, S, "GIT_URL")?;
    // The git plugin reports the remote-tracking name ("origin/main");
    // multibranch pipelines set BRANCH_NAME / TAG_NAME.
    let tag = get(env, "TAG_NAME").map(String::from);
    let branch = match &tag {
        Some(_) => None,
        None => get(env, "BRANCH_NAME")
            .or_else(|| get(env, "GIT_BRANCH"))
            .map(|b| {
                b.strip_prefix("refs/heads/")
                    .or_else(|| b.strip_prefix("origin/"))
                    .unwrap_or(b)
                    .to_string()
            }),
    };
    let git_ref = match (&tag, &branch) {
        (Some(t), _) => Some(format!("refs/tags/{t}")),
        (None, Some(b)) => Some(format!("refs/heads/{b}")),
        _ => None,
    };
    let build_url = get(env, "BUILD_URL").map(String::from);
    let mut internal = BTreeMap::new();
    if let Some(n) = get(env, "BUILD_NUMBER") {
        internal.insert("build_number".into(), n.to_string());
    }
    Ok(CiInfo {
        system: CiSystem::Jenkins,
        repository: normalize_remote(url),
        commit: commit.to_string(),
        git_ref,
        branch,
        tag,
        workflow: get(env, "JOB_NAME").map(String::from),
        pipeline: None,
        invocation_id: build_url
            .clone()
            .or_else(|| get(env, "BUILD_TAG").map(String::from)),
        build_url,
        builder_id: get(env, "JENKINS_URL")
            .map(|u| u.to_string())
            .unwrap_or_else(|| "https://keybroker.dev/builders/jenkins".into()),
        started_on: None,
        internal,
    })
}

fn git(dir: &Path, args: &[&str]) -> Result<Option<String>, Error> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| {
            Error::Other(format!(
                "no CI environment detected and git cannot run: {e}"
            ))
        })?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty()))
}

fn git_checkout(env: &Env, dir: &Path) -> Result<CiInfo, Error> {
    let commit = git(dir, &["rev-parse", "HEAD"])?.ok_or_else(|| {
        Error::Other(format!(
            "no CI environment detected (GitHub Actions, GitLab CI, Jenkins) and {} is not a git checkout with a commit",
            dir.display()
        ))
    })?;
    let git_ref = git(dir, &["symbolic-ref", "-q", "HEAD"])?;
    let (branch, _) = git_ref.as_deref().map(ref_names).unwrap_or_default();
    // The branch's upstream remote, else origin, else the first remote.
    let remote = match &branch {
        Some(b) => git(dir, &["config", &format!("branch.{b}.remote")])?,
        None => None,
    };
    let remote = match remote {
        Some(r) => Some(r),
        None => git(dir, &["remote"])?.and_then(|all| {
            let names: Vec<&str> = all.lines().collect();
            names
                .iter()
                .find(|n| **n == "origin")
                .or(names.first())
                .map(|n| n.to_string())
        }),
    };
    let url = match &remote {
        Some(r) => git(dir, &["remote", "get-url", r])?,
        None => None,
    };
    let repository = match url {
        Some(u) => normalize_remote(&u),
        None => {
            let top = git(dir, &["rev-parse", "--show-toplevel"])?
                .unwrap_or_else(|| dir.display().to_string());
            format!("file://{top}")
        }
    };
    let tag = git(dir, &["describe", "--tags", "--exact-match", "HEAD"])?;
    // HOSTNAME is a shell variable, often not exported; the kernel knows too.
    let kernel_host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let host = get(env, "HOSTNAME")
        .or(kernel_host
            .as_deref()
            .map(str::trim)
            .filter(|h| !h.is_empty()))
        .unwrap_or("localhost");
    Ok(CiInfo {
        system: CiSystem::Git,
        repository,
        commit,
        git_ref: git_ref.or_else(|| tag.as_ref().map(|t| format!("refs/tags/{t}"))),
        branch,
        tag,
        workflow: None,
        pipeline: None,
        build_url: None,
        invocation_id: None,
        builder_id: format!("https://keybroker.dev/builders/local/{host}"),
        started_on: None,
        internal: BTreeMap::new(),
    })
}

/// A remote URL without credentials or `.git`, scp-like SSH remotes
/// (`git@host:path`) as `https://host/path`.
pub fn normalize_remote(url: &str) -> String {
    let url = url.trim();
    let converted = match url.split_once("://") {
        Some((scheme, rest)) => {
            // Drop user info (tokens, passwords) from the authority.
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if scheme == "ssh" || scheme == "git" {
                // As https, where an ssh port means nothing.
                let host = host.split_once(':').map_or(host, |(h, _)| h);
                format!("https://{host}/{path}")
            } else {
                format!("{scheme}://{host}/{path}")
            }
        }
        None => match url.split_once(':') {
            Some((userhost, path)) if !userhost.contains('/') => {
                let host = userhost.rsplit_once('@').map_or(userhost, |(_, h)| h);
                format!("https://{host}/{}", path.trim_start_matches('/'))
            }
            _ => url.to_string(),
        },
    };
    converted
        .trim_end_matches('/')
        .trim_end_matches(".git")
        .to_string()
}

/// `keybroker sign --ci-annotations`: `commit`, `branch` (or `tag`), `repo`
/// and `build-url`, the annotations of cosign's signing walkthroughs, taken
/// from the CI instead of typed by hand.
pub fn annotations(info: &CiInfo) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    a.insert("commit".to_string(), info.commit.clone());
    a.insert("repo".to_string(), info.repository.clone());
    if let Some(b) = &info.branch {
        a.insert("branch".to_string(), b.clone());
    }
    if let Some(t) = &info.tag {
        a.insert("tag".to_string(), t.clone());
    }
    if let Some(u) = &info.build_url {
        a.insert("build-url".to_string(), u.clone());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn remotes_lose_credentials_and_suffixes() {
        assert_eq!(
            normalize_remote("git@github.com:o/r.git"),
            "https://github.com/o/r"
        );
        assert_eq!(
            normalize_remote("https://oauth2:glpat-SECRET@gitlab.example/g/p.git"),
            "https://gitlab.example/g/p"
        );
        assert_eq!(
            normalize_remote("ssh://git@git.example:2222/team/app.git"),
            "https://git.example/team/app"
        );
        assert_eq!(
            normalize_remote("https://git.example:8443/a/b/"),
            "https://git.example:8443/a/b"
        );
    }

    #[test]
    fn github_fixture() {
        let e = env(&[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_SERVER_URL", "https://github.com"),
            ("GITHUB_REPOSITORY", "acme/app"),
            ("GITHUB_SHA", "0123456789abcdef0123456789abcdef01234567"),
            ("GITHUB_REF", "refs/heads/main"),
            (
                "GITHUB_WORKFLOW_REF",
                "acme/app/.github/workflows/release.yml@refs/heads/main",
            ),
            ("GITHUB_RUN_ID", "42"),
            ("GITHUB_RUN_ATTEMPT", "2"),
            ("GITHUB_EVENT_NAME", "push"),
            ("RUNNER_ENVIRONMENT", "self-hosted"),
        ]);
        let i = detect(&e, Path::new("/nonexistent")).unwrap();
        assert_eq!(i.system, CiSystem::GitHubActions);
        assert_eq!(i.repository, "https://github.com/acme/app");
        assert_eq!(i.branch.as_deref(), Some("main"));
        assert_eq!(
            i.build_url.as_deref(),
            Some("https://github.com/acme/app/actions/runs/42/attempts/2")
        );
        assert_eq!(
            i.builder_id,
            "https://github.com/actions/runner/self-hosted"
        );
        assert_eq!(i.internal["event_name"], "push");
        let a = annotations(&i);
        assert_eq!(a["commit"], "0123456789abcdef0123456789abcdef01234567");
        assert_eq!(a["repo"], "https://github.com/acme/app");
        assert_eq!(a["branch"], "main");
        assert!(!a.contains_key("tag"));
        // A tag build.
        let mut e2 = e.clone();
        e2.insert("GITHUB_REF".into(), "refs/tags/v1.2.0".into());
        let i = detect(&e2, Path::new("/nonexistent")).unwrap();
        assert_eq!((i.branch, i.tag.as_deref()), (None, Some("v1.2.0")));
        // Missing essentials are an error, not an empty provenance.
        let mut e3 = e;
        e3.remove("GITHUB_SHA");
        assert!(detect(&e3, Path::new("/nonexistent"))
            .unwrap_err()
            .to_string()
            .contains("GITHUB_SHA"));
    }

    #[test]
    fn gitlab_fixture() {
        let e = env(&[
            ("GITLAB_CI", "true"),
            ("CI_SERVER_URL", "https://gitlab.example"),
            ("CI_PROJECT_URL", "https://gitlab.example/grp/app"),
            ("CI_PROJECT_PATH", "grp/app"),
            ("CI_COMMIT_SHA", "89abcdef0123456789abcdef0123456789abcdef"),
            ("CI_COMMIT_BRANCH", "develop"),
            ("CI_COMMIT_REF_NAME", "develop"),
            (
                "CI_PIPELINE_URL",
                "https://gitlab.example/grp/app/-/pipelines/7",
            ),
            ("CI_JOB_URL", "https://gitlab.example/grp/app/-/jobs/99"),
            ("CI_RUNNER_ID", "12"),
            ("CI_JOB_STARTED_AT", "2026-11-25T09:00:00Z"),
            ("CI_PIPELINE_SOURCE", "push"),
            (
                "CI_REPOSITORY_URL",
                "https://gitlab-ci-token:SECRET@gitlab.example/grp/app.git",
            ),
        ]);
        let i = detect(&e, Path::new("/nonexistent")).unwrap();
        assert_eq!(i.system, CiSystem::GitLabCi);
        assert_eq!(i.repository, "https://gitlab.example/grp/app");
        assert_eq!(i.git_ref.as_deref(), Some("refs/heads/develop"));
        assert_eq!(i.workflow.as_deref(), Some(".gitlab-ci.yml"));
        assert_eq!(
            i.pipeline.as_deref(),
            Some("https://gitlab.example/grp/app/-/pipelines/7")
        );
        assert_eq!(i.builder_id, "https://gitlab.example/grp/app/-/runners/12");
        assert_eq!(i.started_on.as_deref(), Some("2026-11-25T09:00:00Z"));
        assert!(!format!("{i:?}").contains("SECRET"));
        let a = annotations(&i);
        assert_eq!(a["build-url"], "https://gitlab.example/grp/app/-/jobs/99");
        // Tag pipelines.
        let mut e2 = e;
        e2.remove("CI_COMMIT_BRANCH");
        e2.insert("CI_COMMIT_TAG".into(), "v3".into());
        e2.insert("CI_COMMIT_REF_NAME".into(), "v3".into());
        let i = detect(&e2, Path::new("/nonexistent")).unwrap();
        assert_eq!(i.git_ref.as_deref(), Some("refs/tags/v3"));
        assert_eq!(i.branch, None);
    }

    #[test]
    fn jenkins_fixture() {
        let e = env(&[
            ("JENKINS_URL", "https://ci.example/"),
            ("BUILD_URL", "https://ci.example/job/app/15/"),
            ("JOB_NAME", "app"),
            ("BUILD_NUMBER", "15"),
            ("GIT_COMMIT", "fedcba9876543210fedcba9876543210fedcba98"),
            ("GIT_BRANCH", "origin/release"),
            ("GIT_URL", "https://user:pw@git.example/team/app.git"),
        ]);
        let i = detect(&e, Path::new("/nonexistent")).unwrap();
        assert_eq!(i.system, CiSystem::Jenkins);
        assert_eq!(i.repository, "https://git.example/team/app");
        assert_eq!(i.branch.as_deref(), Some("release"));
        assert_eq!(i.git_ref.as_deref(), Some("refs/heads/release"));
        assert_eq!(
            i.invocation_id.as_deref(),
            Some("https://ci.example/job/app/15/")
        );
        assert_eq!(i.workflow.as_deref(), Some("app"));
        assert_eq!(i.builder_id, "https://ci.example/");
    }

    #[test]
    fn plain_git_checkout() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let run = |args: &[&str]| {
            let st = Command::new("git")
                .arg("-C")
                .arg(d)
                .args(args)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@example.com")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@example.com")
                .output()
                .unwrap();
            assert!(st.status.success(), "git {args:?}: {st:?}");
            String::from_utf8(st.stdout).unwrap().trim().to_string()
        };
        run(&["init", "-q", "-b", "feature/x"]);
        std::fs::write(d.join("f"), "x").unwrap();
        run(&["add", "f"]);
        run(&["commit", "-q", "-m", "one"]);
        run(&[
            "remote",
            "add",
            "origin",
            "https://tok@git.example/team/app.git",
        ]);
        let head = run(&["rev-parse", "HEAD"]);
        let i = detect(&env(&[("HOSTNAME", "box1")]), d).unwrap();
        assert_eq!(i.system, CiSystem::Git);
        assert_eq!(i.commit, head);
        assert_eq!(i.repository, "https://git.example/team/app");
        assert_eq!(i.git_ref.as_deref(), Some("refs/heads/feature/x"));
        assert_eq!(i.branch.as_deref(), Some("feature/x"));
        assert_eq!(i.builder_id, "https://keybroker.dev/builders/local/box1");
        // A tag on HEAD is seen; the start time can be given.
        run(&["tag", "v9"]);
        let i = detect(
            &env(&[("KEYBROKER_BUILD_STARTED_ON", "2026-11-25T08:00:00Z")]),
            d,
        )
        .unwrap();
        assert_eq!(i.tag.as_deref(), Some("v9"));
        assert_eq!(i.started_on.as_deref(), Some("2026-11-25T08:00:00Z"));
        // Not a checkout: a clear error.
        let empty = tempfile::tempdir().unwrap();
        let err = detect(&Env::new(), empty.path()).unwrap_err().to_string();
        assert!(err.contains("not a git checkout"), "{err}");
    }
}
