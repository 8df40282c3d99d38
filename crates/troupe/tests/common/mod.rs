//! Shared by the README tests: which lines of a README code block a test file does not hold.

/// The lines of the README's code block that starts at the first `marker` (up to its closing
/// fence) that no line of `this` contains, after `rewrite` (the README's `?` may stand for the
/// test's `unwrap()`); empty lines and those `skip` names are not checked.
pub(crate) fn missing_lines(
    readme: &str,
    marker: &str,
    this: &str,
    skip: impl Fn(&str) -> bool,
    rewrite: impl Fn(&str) -> String,
) -> Vec<String> {
    let start = readme
        .find(marker)
        .unwrap_or_else(|| panic!("the README shows {marker:?}"));
    let block = &readme[start..];
    let block = &block[..block
        .find("```")
        .unwrap_or_else(|| panic!("the block of {marker:?} ends"))];
    let here: Vec<&str> = this.lines().map(str::trim).collect();
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !skip(l))
        .map(&rewrite)
        .filter(|l| !here.iter().any(|h| h.contains(l.as_str())))
        .collect()
}
