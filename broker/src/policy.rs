//! Policy: caller × key alias × image repository × required annotations × raw
//! digests. Default deny. A denial names the rule family that failed, never the
//! other rules. This is the seam the full policy engine (issue 6) grows from.

use std::collections::BTreeMap;

use crate::{config::RuleConfig, identity::Caller};

/// Who a rule admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerMatcher {
    /// Any authenticated caller.
    Any,
    /// A uid.
    Uid(u32),
    /// A gid: the peer's effective gid or one of its supplementary groups.
    Gid(u32),
    /// A client certificate with this URI SAN (e.g. a SPIFFE ID).
    X509Uri(String),
    /// A client certificate with this DNS SAN.
    X509Dns(String),
}

impl CallerMatcher {
    /// Parses `uid:N`, `gid:N`, `x509-uri:URI`, `x509-dns:NAME` or `*`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "caller {s:?}: expected \"uid:N\", \"gid:N\", \"x509-uri:URI\", \"x509-dns:NAME\" or \"*\""
            )
        };
        if s == "*" {
            return Ok(CallerMatcher::Any);
        }
        let (kind, v) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "uid" => Ok(CallerMatcher::Uid(v.parse().map_err(|_| bad())?)),
            "gid" => Ok(CallerMatcher::Gid(v.parse().map_err(|_| bad())?)),
            "x509-uri" if !v.is_empty() => Ok(CallerMatcher::X509Uri(v.to_string())),
            // DNS names compare case-insensitively.
            "x509-dns" if !v.is_empty() => Ok(CallerMatcher::X509Dns(v.to_ascii_lowercase())),
            _ => Err(bad()),
        }
    }

    fn matches(&self, c: &Caller) -> bool {
        match (self, c) {
            (CallerMatcher::Any, _) => true,
            (CallerMatcher::Uid(u), Caller::Unix { uid, .. }) => uid == u,
            // The effective gid or any supplementary group, as file access works.
            (CallerMatcher::Gid(g), Caller::Unix { gid, groups, .. }) => {
                gid == g || groups.contains(g)
            }
            (CallerMatcher::X509Uri(want), Caller::Certificate(id)) => {
                id.uris.iter().any(|u| u == want)
            }
            (CallerMatcher::X509Dns(want), Caller::Certificate(id)) => {
                id.dns.iter().any(|d| d.eq_ignore_ascii_case(want))
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    callers: Vec<CallerMatcher>,
    keys: Vec<String>,
    images: Vec<String>,
    require_annotations: Vec<String>,
    allow_raw_digest: bool,
    claims: BTreeMap<String, String>,
}

impl Rule {
    fn admits_token(&self, token: Option<&crate::oidc::Token>) -> bool {
        if self.claims.is_empty() {
            return true;
        }
        let Some(t) = token else { return false };
        self.claims.iter().all(|(k, pat)| {
            t.claims
                .get(k)
                .is_some_and(|v| crate::oidc::claim_match(pat, v))
        })
    }
    fn admits_caller(&self, c: &Caller) -> bool {
        self.callers.iter().any(|m| m.matches(c))
    }
    fn admits_key(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == "*" || k == key)
    }
    fn admits_image(&self, image: &str) -> bool {
        self.images
            .iter()
            .any(|g| glob_match(g.as_bytes(), image.as_bytes()))
    }
}

/// What the caller wants to do.
#[derive(Debug)]
pub enum Action<'a> {
    /// SignImage.
    SignImage {
        /// Key alias.
        key: &'a str,
        /// Repository (docker-reference).
        image: &'a str,
        /// Client annotations.
        annotations: &'a BTreeMap<String, String>,
    },
    /// An attestation about an image (AttestImage, or an in-toto statement
    /// through SignMessage): key and image repository; no annotations exist.
    AttestImage {
        /// Key alias.
        key: &'a str,
        /// Repository (the statement's subject name).
        image: &'a str,
    },
    /// Raw digest Sign.
    SignDigest {
        /// Key alias.
        key: &'a str,
    },
}

/// Why a request was refused: the rule family that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No rule names this caller.
    #[error("no policy rule admits caller {0}")]
    Caller(String),
    /// Rules name this caller, but require ID token claims it did not present.
    #[error("no policy rule for caller {0} accepts its ID token (claims, or no token sent)")]
    Claims(String),
    /// No rule for this caller names the key.
    #[error("policy does not let this caller use key {0:?}")]
    Key(String),
    /// No rule for caller and key covers the image.
    #[error("policy does not let this caller sign {image} with key {key:?}")]
    Image {
        /// Repository.
        image: String,
        /// Key alias.
        key: String,
    },
    /// Every matching rule requires annotations the request lacks.
    #[error("missing required annotation(s): {0}")]
    Annotations(String),
    /// Raw digests are not allowed for this key.
    #[error("raw digest signing is not allowed for key {0:?} (policy: allow_raw_digest)")]
    RawDigest(String),
}

/// The compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Compiles validated config rules.
    pub fn new(rules: &[RuleConfig]) -> Result<Self, String> {
        let rules = rules
            .iter()
            .map(|r| {
                Ok(Rule {
                    callers: r
                        .callers
                        .iter()
                        .map(|c| CallerMatcher::parse(c))
                        .collect::<Result<_, _>>()?,
                    keys: r.keys.clone(),
                    images: r.images.clone(),
                    require_annotations: r.require_annotations.clone(),
                    allow_raw_digest: r.allow_raw_digest,
                    claims: r.claims.clone(),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Policy { rules })
    }

    /// Allows or denies a caller without an ID token.
    pub fn check(&self, caller: &Caller, action: &Action<'_>) -> Result<(), Denied> {
        self.check_with_token(caller, None, action)
    }

    /// Allows or denies; the first family that no rule satisfies is reported.
    pub fn check_with_token(
        &self,
        caller: &Caller,
        token: Option<&crate::oidc::Token>,
        action: &Action<'_>,
    ) -> Result<(), Denied> {
        let by_caller: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| r.admits_caller(caller))
            .collect();
        if by_caller.is_empty() {
            return Err(Denied::Caller(caller.to_string()));
        }
        let for_caller: Vec<&Rule> = by_caller
            .into_iter()
            .filter(|r| r.admits_token(token))
            .collect();
        if for_caller.is_empty() {
            return Err(Denied::Claims(caller.to_string()));
        }
        let key = match action {
            Action::SignImage { key, .. }
            | Action::AttestImage { key, .. }
            | Action::SignDigest { key } => *key,
        };
        let for_key: Vec<&Rule> = for_caller
            .into_iter()
            .filter(|r| r.admits_key(key))
            .collect();
        if for_key.is_empty() {
            return Err(Denied::Key(key.to_string()));
        }
        match action {
            Action::SignDigest { key } => {
                if for_key.iter().any(|r| r.allow_raw_digest) {
                    Ok(())
                } else {
                    Err(Denied::RawDigest(key.to_string()))
                }
            }
            Action::AttestImage { key, image } => {
                if for_key.iter().any(|r| r.admits_image(image)) {
                    Ok(())
                } else {
                    Err(Denied::Image {
                        image: image.to_string(),
                        key: key.to_string(),
                    })
                }
            }
            Action::SignImage {
                key,
                image,
                annotations,
            } => {
                let for_image: Vec<&Rule> = for_key
                    .into_iter()
                    .filter(|r| r.admits_image(image))
                    .collect();
                if for_image.is_empty() {
                    return Err(Denied::Image {
                        image: image.to_string(),
                        key: key.to_string(),
                    });
                }
                let mut missing_best: Option<Vec<&str>> = None;
                for r in for_image {
                    let missing: Vec<&str> = r
                        .require_annotations
                        .iter()
                        .filter(|a| !annotations.contains_key(a.as_str()))
                        .map(String::as_str)
                        .collect();
                    if missing.is_empty() {
                        return Ok(());
                    }
                    if missing_best
                        .as_ref()
                        .is_none_or(|m| missing.len() < m.len())
                    {
                        missing_best = Some(missing);
                    }
                }
                Err(Denied::Annotations(
                    missing_best.unwrap_or_default().join(", "),
                ))
            }
        }
    }

    /// Whether any rule lets this caller use the key (for ListKeys).
    pub fn may_use_key(
        &self,
        caller: &Caller,
        token: Option<&crate::oidc::Token>,
        key: &str,
    ) -> bool {
        self.rules
            .iter()
            .any(|r| r.admits_caller(caller) && r.admits_token(token) && r.admits_key(key))
    }
}

/// Glob over repository names: `*` matches within one path segment, `**` across.
#[doc(hidden)]
pub fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    wildcard_match(pat, s, true)
}

/// `pat` against `s` in O(|pat| × |s|) time and O(|s|) space. With `segments`,
/// `**` matches any run of bytes and `*` any run without `/` (repository
/// globs; `***` is `**` then `*`); without, every `*` matches any run (claim
/// globs). Trying every split recursively instead is exponential in the
/// number of stars: the fuzz target `config` found a 20-byte pattern
/// (`**/**/**/**/**/**/x`) on an 81-byte name running for minutes.
pub(crate) fn wildcard_match(pat: &[u8], s: &[u8], segments: bool) -> bool {
    enum Tok {
        Any,
        InSegment,
        Byte(u8),
    }
    let mut toks = Vec::with_capacity(pat.len());
    let mut i = 0;
    while i < pat.len() {
        toks.push(match pat[i] {
            b'*' if segments && pat.get(i + 1) == Some(&b'*') => {
                i += 1;
                Tok::Any
            }
            b'*' if segments => Tok::InSegment,
            b'*' => Tok::Any,
            c => Tok::Byte(c),
        });
        i += 1;
    }
    // `next[j]`: the tokens after the current one match `s[j..]`.
    let n = s.len();
    let mut next = vec![false; n + 1];
    next[n] = true;
    let mut cur = vec![false; n + 1];
    for tok in toks.iter().rev() {
        for j in (0..=n).rev() {
            cur[j] = match tok {
                Tok::Byte(c) => j < n && s[j] == *c && next[j + 1],
                Tok::Any => next[j] || (j < n && cur[j + 1]),
                Tok::InSegment => next[j] || (j < n && s[j] != b'/' && cur[j + 1]),
            };
        }
        std::mem::swap(&mut cur, &mut next);
    }
    next[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        callers: &[&str],
        keys: &[&str],
        images: &[&str],
        req: &[&str],
        raw: bool,
    ) -> RuleConfig {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        RuleConfig {
            callers: v(callers),
            keys: v(keys),
            images: v(images),
            require_annotations: v(req),
            allow_raw_digest: raw,
            claims: Default::default(),
        }
    }

    #[test]
    fn claims_rules_need_a_matching_token() {
        let mut r = rule(&["*"], &["k"], &["**"], &[], true);
        r.claims.insert("repository".into(), "acme/*".into());
        r.claims.insert("ref".into(), "refs/heads/main".into());
        let p = Policy::new(&[r]).unwrap();
        let tok = |repo: &str, git_ref: &str| crate::oidc::Token {
            issuer: "https://issuer.test".into(),
            subject: "s".into(),
            claims: [
                ("repository".to_string(), repo.to_string()),
                ("ref".to_string(), git_ref.to_string()),
            ]
            .into(),
        };
        let a = Action::SignDigest { key: "k" };
        let c = caller(5, 5);
        assert!(p
            .check_with_token(&c, Some(&tok("acme/api", "refs/heads/main")), &a)
            .is_ok());
        assert!(matches!(
            p.check_with_token(&c, Some(&tok("evil/api", "refs/heads/main")), &a),
            Err(Denied::Claims(_))
        ));
        assert!(matches!(
            p.check_with_token(&c, Some(&tok("acme/api", "refs/heads/dev")), &a),
            Err(Denied::Claims(_))
        ));
        assert!(matches!(p.check(&c, &a), Err(Denied::Claims(_))));
        assert!(!p.may_use_key(&c, None, "k"));
        assert!(p.may_use_key(&c, Some(&tok("acme/x", "refs/heads/main")), "k"));
    }

    fn caller(uid: u32, gid: u32) -> Caller {
        Caller::Unix {
            uid,
            gid,
            pid: None,
            groups: vec![],
        }
    }

    #[test]
    fn certificate_callers_match_their_sans_only() {
        let p = Policy::new(&[
            rule(
                &["x509-uri:spiffe://example.org/ns/ci/sa/builder"],
                &["k"],
                &["**"],
                &[],
                true,
            ),
            rule(&["x509-dns:Agent.Example.org"], &["d"], &["**"], &[], true),
        ])
        .unwrap();
        let cert = |uris: &[&str], dns: &[&str]| {
            Caller::Certificate(crate::identity::CertIdentity {
                uris: uris.iter().map(|s| s.to_string()).collect(),
                dns: dns.iter().map(|s| s.to_string()).collect(),
                subject: "CN=x".into(),
            })
        };
        let raw = |key| Action::SignDigest { key };
        let builder = cert(&["spiffe://example.org/ns/ci/sa/builder"], &[]);
        assert!(p.check(&builder, &raw("k")).is_ok());
        assert!(matches!(p.check(&builder, &raw("d")), Err(Denied::Key(_))));
        let other = cert(&["spiffe://example.org/ns/ci/sa/other"], &[]);
        assert!(matches!(p.check(&other, &raw("k")), Err(Denied::Caller(_))));
        assert!(p
            .check(&cert(&[], &["agent.example.org"]), &raw("d"))
            .is_ok());
        // A unix caller never matches a certificate rule, and vice versa.
        assert!(matches!(
            p.check(&caller(0, 0), &raw("k")),
            Err(Denied::Caller(_))
        ));
        assert!(CallerMatcher::parse("x509-uri:").is_err());
        assert!(CallerMatcher::parse("spiffe://x").is_err());
    }

    /// The reference the glob is checked against: `**` is any run of
    /// characters, `*` any run without `/`, everything else itself (a regex).
    fn reference_regex(pat: &str) -> regex::Regex {
        let mut re = String::from("^");
        let mut rest = pat;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("**") {
                re.push_str(".*");
                rest = r;
            } else if let Some(r) = rest.strip_prefix('*') {
                re.push_str("[^/]*");
                rest = r;
            } else {
                let c = rest.chars().next().unwrap();
                re.push_str(&regex::escape(&c.to_string()));
                rest = &rest[c.len_utf8()..];
            }
        }
        re.push('$');
        regex::Regex::new(&re).unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn glob_matches_its_reference(pat in "[ab/*.]{0,10}", s in "[ab/.]{0,12}") {
            proptest::prop_assert_eq!(
                glob_match(pat.as_bytes(), s.as_bytes()),
                reference_regex(&pat).is_match(&s),
                "pattern {:?} on {:?}", pat, s
            );
        }
    }

    /// Found by the config fuzz target: the recursive matcher took minutes on
    /// this (exponential in the number of stars); the DP answers at once.
    #[test]
    fn many_stars_stay_polynomial() {
        let name = "a/".repeat(200) + "b";
        assert!(!glob_match(b"**/**/**/**/**/**/x", name.as_bytes()));
        assert!(glob_match(b"**/**/**/**/**/**/b", name.as_bytes()));
        assert!(glob_match(b"*/*/**/*/b", name.as_bytes()));
        let value = "a".repeat(300);
        assert!(!crate::oidc::claim_match("*a*a*a*a*a*a*b", &value));
        assert!(crate::oidc::claim_match("*a*a*a*a*a*a*", &value));
    }

    #[test]
    fn globs_respect_path_segments() {
        assert!(glob_match(
            b"reg.example.com/app/*",
            b"reg.example.com/app/api"
        ));
        assert!(!glob_match(
            b"reg.example.com/app/*",
            b"reg.example.com/app/api/sub"
        ));
        assert!(glob_match(
            b"reg.example.com/**",
            b"reg.example.com/app/api/sub"
        ));
        assert!(!glob_match(
            b"reg.example.com/app/*",
            b"reg.example.com/other/api"
        ));
        assert!(glob_match(b"**", b"anything/at/all"));
    }

    #[test]
    fn default_deny_and_denials_name_the_family() {
        let empty = BTreeMap::new();
        let p = Policy::new(&[]).unwrap();
        let a = Action::SignDigest { key: "k" };
        assert!(matches!(p.check(&caller(1, 1), &a), Err(Denied::Caller(_))));

        let p = Policy::new(&[rule(
            &["uid:1001", "gid:2000"],
            &["release"],
            &["reg/app/*"],
            &["commit"],
            false,
        )])
        .unwrap();
        let sign = |key, image, ann| Action::SignImage {
            key,
            image,
            annotations: ann,
        };
        assert!(matches!(
            p.check(&caller(5, 5), &sign("release", "reg/app/x", &empty)),
            Err(Denied::Caller(_))
        ));
        assert!(matches!(
            p.check(&caller(5, 2000), &sign("dev", "reg/app/x", &empty)),
            Err(Denied::Key(_))
        ));
        assert!(matches!(
            p.check(&caller(1001, 1), &sign("release", "reg/other/x", &empty)),
            Err(Denied::Image { .. })
        ));
        assert_eq!(
            p.check(&caller(1001, 1), &sign("release", "reg/app/x", &empty)),
            Err(Denied::Annotations("commit".into()))
        );
        let ann = BTreeMap::from([("commit".to_string(), "abc".to_string())]);
        assert_eq!(
            p.check(&caller(1001, 1), &sign("release", "reg/app/x", &ann)),
            Ok(())
        );
        assert!(matches!(
            p.check(&caller(1001, 1), &Action::SignDigest { key: "release" }),
            Err(Denied::RawDigest(_))
        ));
    }
}
