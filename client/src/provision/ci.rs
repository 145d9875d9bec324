//! `generate-key-pair` and `public-key` for CI systems: GitLab CI/CD variables
//! (`gitlab://…`) and GitHub Actions secrets (`github://…`).
//!
//! The key pair is generated in memory, encrypted in cosign's format, and
//! stored as `COSIGN_PRIVATE_KEY`, `COSIGN_PASSWORD` and `COSIGN_PUBLIC_KEY`;
//! the public key is also written locally (`cosign.pub`). Only names are
//! printed, never values. GitHub secrets cannot be read back, so the public key
//! also goes into an Actions variable, which `public-key` reads.

use std::path::Path;

use keybroker_providers::{
    ci_names, cosign_key,
    github::{self, GitHubClient, GitHubOptions, Scope, Visibility},
    gitlab::{self, GitLabClient, GitLabOptions, NewVariable, Written},
    KeyRef, P256Signer, Password,
};
use zeroize::Zeroizing;

use crate::Error;

/// Which repositories of an organization may use its secrets and variable.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OrgVisibility {
    /// Every repository of the organization.
    All,
    /// Private and internal repositories only.
    #[default]
    Private,
    /// The repositories named with --github-selected-repository-id.
    Selected,
}

impl OrgVisibility {
    fn as_str(self) -> &'static str {
        match self {
            OrgVisibility::All => "all",
            OrgVisibility::Private => "private",
            OrgVisibility::Selected => "selected",
        }
    }
}

/// Flags of `generate-key-pair` for `gitlab://` and `github://` targets.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "GitLab and GitHub targets (gitlab://…, github://…)")]
pub struct CiFlags {
    /// gitlab://: mark the three variables protected (only pipelines on
    /// protected branches and tags get them)
    #[arg(long)]
    pub gitlab_protected: bool,
    /// gitlab://: mask COSIGN_PASSWORD in job logs. Default: masked when GitLab
    /// can mask it (8 or more characters, no whitespace), else stored unmasked
    /// with a warning; =true fails instead, =false never masks. The PEM keys are
    /// never masked (GitLab cannot mask multi-line values)
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub gitlab_masked: Option<bool>,
    /// github://ORG: which repositories of the organization may use the
    /// secrets and the variable
    #[arg(long, value_enum, default_value_t = OrgVisibility::Private)]
    pub github_visibility: OrgVisibility,
    /// github://ORG with --github-visibility selected: id of a repository that
    /// may use them. Repeatable
    #[arg(long = "github-selected-repository-id", value_name = "ID")]
    pub github_selected_repository_ids: Vec<u64>,
}

impl CiFlags {
    fn gitlab_given(&self) -> bool {
        self.gitlab_protected || self.gitlab_masked.is_some()
    }
    fn github_given(&self) -> bool {
        self.github_visibility != OrgVisibility::Private
            || !self.github_selected_repository_ids.is_empty()
    }
}

/// Whether `generate-key-pair` handles this reference here.
pub fn handles(key_ref: &KeyRef) -> bool {
    matches!(key_ref, KeyRef::GitLab { .. } | KeyRef::GitHub { .. })
}

/// `keybroker public-key --key gitlab://…|github://…`: the stored
/// `COSIGN_PUBLIC_KEY`. `None` for other references.
pub async fn public_key(key_ref: &KeyRef) -> Result<Option<String>, Error> {
    match key_ref {
        KeyRef::GitLab { path } => Ok(Some(
            gitlab::read_public_key(path, &GitLabOptions::default()).await?,
        )),
        KeyRef::GitHub { .. } => Ok(Some(
            github::read_public_key(key_ref, &GitHubOptions::default()).await?,
        )),
        _ => Ok(None),
    }
}

/// A fresh key pair, encrypted with `password` in cosign's format.
struct NewPair {
    encrypted_pem: Zeroizing<String>,
    public_pem: String,
    password: Zeroizing<String>,
}

fn new_pair(password: &Password) -> Result<NewPair, Error> {
    let password = Zeroizing::new(
        std::str::from_utf8(password.expose())
            .map_err(|_| {
                Error::Other("the password must be UTF-8 to be stored in a CI variable".into())
            })?
            .to_string(),
    );
    let (signer, der) = P256Signer::generate()?;
    let encrypted_pem = Zeroizing::new(cosign_key::encrypt_pem(&der, password.as_bytes())?);
    Ok(NewPair {
        encrypted_pem,
        public_pem: signer.public_key_pem().to_string(),
        password,
    })
}

/// `keybroker generate-key-pair gitlab://…|github://…`: generates the key pair,
/// stores it, writes `pub_path`. Refuses to replace an existing key pair (or
/// `pub_path`) without `force`.
pub async fn generate_key_pair(
    key_ref: &KeyRef,
    flags: &CiFlags,
    pub_path: &Path,
    force: bool,
    password: impl FnOnce() -> Result<Password, Error>,
) -> Result<(), Error> {
    if pub_path.exists() && !force {
        return Err(Error::Other(format!(
            "{} already exists; pass --force to overwrite it",
            pub_path.display()
        )));
    }
    match key_ref {
        KeyRef::GitLab { path } => {
            if flags.github_given() {
                return Err(Error::Other(
                    "--github-* flags apply to github:// targets only".into(),
                ));
            }
            gitlab_generate(key_ref, path, flags, pub_path, force, password).await
        }
        KeyRef::GitHub { .. } => {
            if flags.gitlab_given() {
                return Err(Error::Other(
                    "--gitlab-* flags apply to gitlab:// targets only".into(),
                ));
            }
            github_generate(key_ref, flags, pub_path, force, password).await
        }
        other => Err(Error::Other(format!(
            "{other} is not a gitlab:// or github:// reference"
        ))),
    }
}

fn replace_refused(key_ref: &KeyRef, place: &str) -> Error {
    Error::Other(format!(
        "{key_ref}: {place} already holds {}; pass --force to replace the key pair (signatures made with the old key will no longer verify against the new public key)",
        ci_names::PRIVATE_KEY
    ))
}

async fn gitlab_generate(
    key_ref: &KeyRef,
    path: &str,
    flags: &CiFlags,
    pub_path: &Path,
    force: bool,
    password: impl FnOnce() -> Result<Password, Error>,
) -> Result<(), Error> {
    let client = GitLabClient::new(&GitLabOptions::default())?;
    let target = client.resolve(path).await?;
    if !force
        && client
            .get_variable(&target, ci_names::PRIVATE_KEY)
            .await?
            .is_some()
    {
        return Err(replace_refused(key_ref, &target.to_string()));
    }
    let password = password()?;
    let pair = new_pair(&password)?;
    let maskable = gitlab::can_mask(&pair.password);
    let mask_password = match flags.gitlab_masked {
        Some(true) if !maskable => {
            return Err(Error::Other(format!(
                "--gitlab-masked: GitLab cannot mask this {}: it masks only values of 8 or more characters without whitespace; choose another password or pass --gitlab-masked=false",
                ci_names::PASSWORD
            )))
        }
        Some(m) => m,
        None => {
            if !maskable {
                eprintln!(
                    "warning: {} is stored unmasked: GitLab masks only values of 8 or more characters without whitespace (--gitlab-masked=false silences this)",
                    ci_names::PASSWORD
                );
            }
            maskable
        }
    };
    // The password first, the public key last: a reader that sees the new
    // public key sees a complete pair.
    let writes = [
        (ci_names::PASSWORD, pair.password.as_str(), mask_password),
        (ci_names::PRIVATE_KEY, pair.encrypted_pem.as_str(), false),
        (ci_names::PUBLIC_KEY, pair.public_pem.as_str(), false),
    ];
    let mut lines = Vec::new();
    for (key, value, masked) in writes {
        let written = client
            .put_variable(
                &target,
                &NewVariable {
                    key,
                    value,
                    masked,
                    protected: flags.gitlab_protected,
                },
            )
            .await?;
        let mut attrs = vec![match written {
            Written::Created => "created",
            Written::Updated => "updated",
        }];
        if masked {
            attrs.push("masked");
        }
        if flags.gitlab_protected {
            attrs.push("protected");
        }
        lines.push(format!("  {key} ({})", attrs.join(", ")));
    }
    super::write_public(pub_path, &pair.public_pem)?;
    eprintln!(
        "Wrote GitLab CI/CD variables (environment scope *) of {target} at {}:\n{}\nPublic key written to {}",
        client.base(),
        lines.join("\n"),
        pub_path.display()
    );
    Ok(())
}

async fn github_generate(
    key_ref: &KeyRef,
    flags: &CiFlags,
    pub_path: &Path,
    force: bool,
    password: impl FnOnce() -> Result<Password, Error>,
) -> Result<(), Error> {
    let scope = Scope::from_ref(key_ref)?;
    let is_org = matches!(scope, Scope::Org { .. });
    if !is_org && flags.github_given() {
        return Err(Error::Other(
            "--github-visibility and --github-selected-repository-id apply to organization targets (github://ORG) only".into(),
        ));
    }
    let selected = flags.github_visibility == OrgVisibility::Selected;
    if selected == flags.github_selected_repository_ids.is_empty() && is_org {
        return Err(Error::Other(if selected {
            "--github-visibility selected needs at least one --github-selected-repository-id".into()
        } else {
            "--github-selected-repository-id needs --github-visibility selected".into()
        }));
    }
    let visibility = Visibility {
        visibility: flags.github_visibility.as_str().into(),
        selected_repository_ids: flags.github_selected_repository_ids.clone(),
    };
    let client = GitHubClient::new(&GitHubOptions::default())?;
    let secrets_key = client.secrets_key(&scope).await?;
    if !force && client.secret_exists(&scope, ci_names::PRIVATE_KEY).await? {
        return Err(replace_refused(key_ref, &scope.to_string()));
    }
    let password = password()?;
    let pair = new_pair(&password)?;
    for (name, value) in [
        (ci_names::PASSWORD, pair.password.as_str()),
        (ci_names::PRIVATE_KEY, pair.encrypted_pem.as_str()),
        (ci_names::PUBLIC_KEY, pair.public_pem.as_str()),
    ] {
        client
            .put_secret(&scope, &secrets_key, name, value, &visibility)
            .await?;
    }
    client
        .put_variable(&scope, ci_names::PUBLIC_KEY, &pair.public_pem, &visibility)
        .await?;
    super::write_public(pub_path, &pair.public_pem)?;
    let shared = if is_org {
        format!(" (visibility {})", visibility.visibility)
    } else {
        String::new()
    };
    eprintln!(
        "Wrote GitHub Actions secrets {}, {}, {} and variable {} of {scope}{shared} at {}\nPublic key written to {}",
        ci_names::PRIVATE_KEY,
        ci_names::PASSWORD,
        ci_names::PUBLIC_KEY,
        ci_names::PUBLIC_KEY,
        client.base(),
        pub_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        ci: CiFlags,
        reference: Option<String>,
    }

    #[test]
    fn masked_flag_takes_an_optional_value_and_never_the_reference() {
        let t = T::parse_from(["t", "--gitlab-masked", "gitlab://g/p"]);
        assert_eq!(t.ci.gitlab_masked, Some(true));
        assert_eq!(t.reference.as_deref(), Some("gitlab://g/p"));
        let t = T::parse_from(["t", "--gitlab-masked=false", "gitlab://g/p"]);
        assert_eq!(t.ci.gitlab_masked, Some(false));
        let t = T::parse_from(["t", "gitlab://g/p"]);
        assert_eq!(t.ci.gitlab_masked, None);
        assert_eq!(t.ci.github_visibility, OrgVisibility::Private);
    }

    #[tokio::test]
    async fn flags_of_the_other_system_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pub_path = dir.path().join("cosign.pub");
        let gitlab_flags = CiFlags {
            gitlab_protected: true,
            ..Default::default()
        };
        let err = generate_key_pair(
            &KeyRef::parse("github://o/r").unwrap(),
            &gitlab_flags,
            &pub_path,
            false,
            || Ok(Password::new("x")),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("--gitlab-"), "{err}");
        let github_flags = CiFlags {
            github_visibility: OrgVisibility::All,
            ..Default::default()
        };
        let err = generate_key_pair(
            &KeyRef::parse("gitlab://g/p").unwrap(),
            &github_flags,
            &pub_path,
            false,
            || Ok(Password::new("x")),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("--github-"), "{err}");
    }
}
