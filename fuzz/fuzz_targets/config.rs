//! keybrokerd's TOML config and its policy: the whole file (keys, rules,
//! limits, OIDC issuers), the compiled policy, repository globs and claim
//! globs.
//!
//! Properties: a config that validates compiles into a policy; every rule
//! admits what it names (its uid caller, its key, an image its globs match,
//! its required annotations); a caller no rule names is refused as a caller;
//! both glob matchers agree with a dynamic-programming reference.
#![no_main]

use std::collections::BTreeMap;

use keybroker_broker::{
    config::Config,
    identity::Caller,
    oidc::claim_match,
    policy::{glob_match, Action, CallerMatcher, Denied, Policy},
};
use libfuzzer_sys::fuzz_target;

/// Reference glob: `**` any bytes, `*` any bytes but `/` (`one_star_slash`
/// false: claim globs, where `*` is any bytes), else the byte itself.
/// Tokenized left to right as the matchers do (`***` is `**` then `*`).
fn reference(pat: &[u8], s: &[u8], double_star: bool) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum T {
        Any,
        Seg,
        Lit(u8),
    }
    let mut toks = Vec::new();
    let mut i = 0;
    while i < pat.len() {
        if pat[i] == b'*' {
            if double_star && pat.get(i + 1) == Some(&b'*') {
                toks.push(T::Any);
                i += 2;
            } else {
                toks.push(if double_star { T::Seg } else { T::Any });
                i += 1;
            }
        } else {
            toks.push(T::Lit(pat[i]));
            i += 1;
        }
    }
    // m[j] after token t: tokens[..t] match s[..j].
    let mut m = vec![false; s.len() + 1];
    m[0] = true;
    for t in toks {
        let mut next = vec![false; s.len() + 1];
        for j in 0..=s.len() {
            next[j] = match t {
                T::Lit(c) => j > 0 && m[j - 1] && s[j - 1] == c,
                T::Any => m[j] || (j > 0 && next[j - 1]),
                T::Seg => m[j] || (j > 0 && next[j - 1] && s[j - 1] != b'/'),
            };
        }
        m = next;
    }
    m[s.len()]
}

fn unix(uid: u32) -> Caller {
    Caller::Unix {
        uid,
        gid: u32::MAX,
        pid: None,
        groups: Vec::new(),
    }
}

fn check_config(config: &Config) {
    let policy = Policy::new(&config.policy).expect("a validated config's policy compiles");
    assert!(config.socket_mode() <= 0o777);
    let _ = config.conn_limits();
    let _ = config.max_request_bytes();
    for rule in &config.policy {
        if !rule.claims.is_empty() {
            continue;
        }
        let Some(key) = rule.keys.first() else {
            continue;
        };
        let key = if key == "*" { "any-key" } else { key.as_str() };
        let annotations: BTreeMap<String, String> = rule
            .require_annotations
            .iter()
            .map(|a| (a.clone(), String::new()))
            .collect();
        for c in &rule.callers {
            let Ok(CallerMatcher::Uid(uid)) = CallerMatcher::parse(c) else {
                continue;
            };
            let caller = unix(uid);
            for glob in &rule.images {
                // Every `*` matching nothing: an image this glob admits.
                let image = glob.replace('*', "");
                let action = Action::SignImage {
                    key,
                    image: &image,
                    annotations: &annotations,
                };
                assert_eq!(
                    policy.check(&caller, &action),
                    Ok(()),
                    "rule {rule:?} must admit {c} signing {image:?} with {key:?}"
                );
                let attest = Action::AttestImage { key, image: &image };
                assert_eq!(policy.check(&caller, &attest), Ok(()));
            }
            if rule.allow_raw_digest {
                assert_eq!(policy.check(&caller, &Action::SignDigest { key }), Ok(()));
            }
            assert!(policy.may_use_key(&caller, None, key));
        }
    }
    // A uid no rule names, with no `*` or gid rule around: refused as a caller.
    let open = config
        .policy
        .iter()
        .flat_map(|r| &r.callers)
        .any(|c| !c.starts_with("uid:"));
    if !open {
        let named: Vec<u32> = config
            .policy
            .iter()
            .flat_map(|r| &r.callers)
            .filter_map(|c| match CallerMatcher::parse(c) {
                Ok(CallerMatcher::Uid(u)) => Some(u),
                _ => None,
            })
            .collect();
        let stranger = (0..=named.len() as u32)
            .find(|u| !named.contains(u))
            .unwrap_or(u32::MAX);
        assert!(matches!(
            policy.check(&unix(stranger), &Action::SignDigest { key: "k" }),
            Err(Denied::Caller(_))
        ));
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(config) = Config::parse(&text) {
        check_config(&config);
    }
    // Globs: the first line is the pattern, the rest the name.
    let (pat, name) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    assert_eq!(
        glob_match(pat, name),
        reference(pat, name, true),
        "image glob {:?} vs {:?}",
        String::from_utf8_lossy(pat),
        String::from_utf8_lossy(name)
    );
    if let (Ok(p), Ok(n)) = (std::str::from_utf8(pat), std::str::from_utf8(name)) {
        assert_eq!(
            claim_match(p, n),
            reference(pat, name, false),
            "claim glob {p:?} vs {n:?}"
        );
    }
});
