//! Models named the way users name them: a Hugging Face Hub repo id
//! (`org/name`) that is already in the local Hugging Face cache resolves to its
//! snapshot directory, as `huggingface_hub` lays it out:
//! `<cache>/models--org--name/refs/main` holds the commit whose files are in
//! `<cache>/models--org--name/snapshots/<commit>/`. Nothing is downloaded.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The Hub cache directory: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (the
/// order `huggingface_hub` uses).
pub fn hub_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// Whether `name` has the shape of a Hub repo id: `org/name`, each part
/// letters, digits, `-`, `_` or `.`, not starting with `.`.
fn is_repo_id(name: &str) -> bool {
    let mut parts = name.split('/');
    let (Some(org), Some(repo), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    [org, repo].iter().all(|p| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    })
}

/// `path` itself when it exists; else, for a Hub repo id, its snapshot in the
/// local cache (the commit `refs/main` names). An id that is not cached is an
/// error naming the cache directory it looked in.
pub fn resolve_model(path: &Path) -> Result<PathBuf> {
    let Some(name) = path.to_str() else {
        return Ok(path.to_path_buf());
    };
    if path.exists() || !is_repo_id(name) {
        return Ok(path.to_path_buf());
    }
    let Some(cache) = hub_cache_dir() else {
        return Err(Error::InvalidArgument(format!(
            "{name}: no such file or directory, and no Hugging Face cache to look in (set HF_HOME or HF_HUB_CACHE)"
        )));
    };
    resolve_in_cache(name, &cache)
}

/// [`resolve_model`] for a repo id in a given cache directory.
pub fn resolve_in_cache(repo_id: &str, cache: &Path) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let not_cached = |why: String| {
        Error::InvalidArgument(format!(
            "{repo_id}: no such file or directory, and not in the local Hugging Face cache: {why} \
             (flashpack does not download; fetch it first, e.g. `huggingface-cli download {repo_id}`)"
        ))
    };
    if !repo.is_dir() {
        return Err(not_cached(format!("{} does not exist", repo.display())));
    }
    let refs = repo.join("refs").join("main");
    let commit = std::fs::read_to_string(&refs).map_err(|_| {
        not_cached(format!(
            "{} is missing (no main revision cached)",
            refs.display()
        ))
    })?;
    let commit = commit.trim();
    if commit.is_empty() || !commit.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(not_cached(format!(
            "{} does not name a commit",
            refs.display()
        )));
    }
    let snapshot = repo.join("snapshots").join(commit);
    if !snapshot.is_dir() {
        return Err(not_cached(format!("{} does not exist", snapshot.display())));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_recognised() {
        assert!(is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(is_repo_id("Qwen/Qwen2.5-0.5B"));
        assert!(!is_repo_id("model.flashpack"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
        assert!(!is_repo_id("/abs"));
    }
}
