//! Parsing and checking the options of `#[actor(...)]`.

use proc_macro2::{Literal, TokenStream};
use quote::{ToTokens, quote};
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::{Expr, Ident, Lit, LitStr, Path, Token, UnOp};
use troupe_options::{ACTOR_OPTIONS, Kind, OptionSpec, PRIORITY_MAX, PRIORITY_MIN};

/// The options `#[actor(...)]` takes: the rows of troupe-options' table that are not closures,
/// in the table's order (the order the error message lists them).
fn macro_options() -> impl Iterator<Item = &'static OptionSpec> {
    ACTOR_OPTIONS.iter().filter(|o| o.in_macro())
}

/// A checked option value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum OptionValue {
    /// A string (queue or actor name).
    Str(String),
    /// An `i32`.
    I32(i32),
    /// A `u64`.
    U64(u64),
    /// A duration, in milliseconds.
    Millis(u64),
    /// A `bool`.
    Bool(bool),
    /// A missed-ticks policy: run once (else skip).
    Missed(bool),
}

/// One `ActorOptions` setter call: `.key(value)`.
#[derive(Clone, Debug)]
pub(crate) struct Setting {
    /// The option (and setter) name.
    pub(crate) key: Ident,
    /// Its value.
    pub(crate) value: OptionValue,
}

impl Setting {
    /// The setter call, `.key(value)`, with `krate` the facade path for `Duration`.
    pub(crate) fn to_call(&self, krate: &Path) -> TokenStream {
        let key = &self.key;
        let value = match &self.value {
            OptionValue::Str(s) => quote!(#s),
            OptionValue::I32(v) => Literal::i32_suffixed(*v).into_token_stream(),
            OptionValue::U64(v) => Literal::u64_suffixed(*v).into_token_stream(),
            OptionValue::Millis(ms) => {
                let ms = Literal::u64_suffixed(*ms);
                quote!(#krate::__private::Duration::from_millis(#ms))
            }
            OptionValue::Bool(b) => quote!(#b),
            OptionValue::Missed(true) => quote!(#krate::__private::MissedTicks::RunOnce),
            OptionValue::Missed(false) => quote!(#krate::__private::MissedTicks::Skip),
        };
        quote!(.#key(#value))
    }
}

/// The parsed options of one `#[actor(...)]`.
#[derive(Clone)]
pub(crate) struct ActorArgs {
    /// `name = "..."`.
    pub(crate) name: Option<String>,
    /// `crate = "..."`.
    pub(crate) krate: Option<Path>,
    /// The `ActorOptions` settings, in the order written.
    pub(crate) settings: Vec<Setting>,
}

/// Adds `error` to the accumulated `errors`.
pub(crate) fn push_error(errors: &mut Option<syn::Error>, error: syn::Error) {
    match errors {
        Some(existing) => existing.combine(error),
        None => *errors = Some(error),
    }
}

/// Parses and checks the attribute's arguments, reporting every problem found.
pub(crate) fn parse_options(attr: TokenStream) -> syn::Result<ActorArgs> {
    let entries = parse_entries.parse2(attr)?;
    let mut errors = None;
    let mut args = ActorArgs {
        name: None,
        krate: None,
        settings: Vec::new(),
    };
    let mut seen: Vec<String> = Vec::new();
    for (key, value) in entries {
        let key_name = key.unraw().to_string();
        let Some(option) = troupe_options::find(&key_name) else {
            push_error(&mut errors, unknown_option(&key, &key_name));
            continue;
        };
        if !option.in_macro() {
            push_error(&mut errors, not_in_macro(&key, option));
            continue;
        }
        let kind = option.kind;
        if seen.contains(&key_name) {
            push_error(
                &mut errors,
                syn::Error::new(key.span(), format!("duplicate option `{key_name}`")),
            );
            continue;
        }
        seen.push(key_name.clone());
        let Some(value) = value else {
            let example = match kind {
                Kind::Bool => "true",
                Kind::Priority | Kind::Count => "3",
                Kind::Duration => "\"30s\"",
                Kind::CratePath => "\"::troupe\"",
                Kind::Cron => "\"0 */5 * * * *\"",
                Kind::TimeZone => "\"UTC\"",
                Kind::Missed => "\"run_once\"",
                _ => "\"...\"",
            };
            push_error(
                &mut errors,
                syn::Error::new(
                    key.span(),
                    format!("option `{key_name}` needs a value: write `{key_name} = {example}`"),
                ),
            );
            continue;
        };
        match check_value(kind, &key_name, &value) {
            Ok(Checked::Name(name)) => args.name = Some(name),
            Ok(Checked::Crate(path)) => args.krate = Some(path),
            Ok(Checked::Setting(value)) => args.settings.push(Setting {
                key: Ident::new(&key_name, key.span()),
                value,
            }),
            Err(e) => push_error(&mut errors, e),
        }
    }
    match errors {
        Some(e) => Err(e),
        None => Ok(args),
    }
}

/// Parses `key = value, ...` (a value may be missing, to report it nicely).
fn parse_entries(input: ParseStream<'_>) -> syn::Result<Vec<(Ident, Option<Expr>)>> {
    let mut entries = Vec::new();
    while !input.is_empty() {
        let key = input.call(Ident::parse_any)?;
        let value = if input.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            Some(input.parse::<Expr>()?)
        } else {
            None
        };
        entries.push((key, value));
        if !input.is_empty() {
            input.parse::<Token![,]>()?;
        }
    }
    Ok(entries)
}

/// The error for an unknown option, with a suggestion when one is close.
fn unknown_option(key: &Ident, name: &str) -> syn::Error {
    let valid: Vec<&str> = macro_options().map(|o| o.name).collect();
    let suggestion = valid
        .iter()
        .map(|v| (edit_distance(name, v), *v))
        .filter(|(d, v)| *d <= 2.max(name.len() / 3) || (name.len() >= 4 && v.contains(name)))
        .min()
        .map(|(_, v)| format!("did you mean `{v}`? "))
        .unwrap_or_default();
    syn::Error::new(
        key.span(),
        format!(
            "unknown actor option `{name}`; {suggestion}valid options are: {}",
            valid.join(", ")
        ),
    )
}

/// The error for an option `#[actor]` cannot express (a closure).
fn not_in_macro(key: &Ident, option: &OptionSpec) -> syn::Error {
    let name = option.name;
    syn::Error::new(
        key.span(),
        format!(
            "option `{name}` takes a closure, which `#[actor]` cannot express: implement `troupe::Actor` \
             by hand and set it in `options()` with `ActorOptions::{name}`"
        ),
    )
}

/// Levenshtein distance, for suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            let delete = previous[j + 1] + 1;
            let insert = current[j] + 1;
            current.push(substitute.min(delete).min(insert));
        }
        previous = current;
    }
    previous[b.len()]
}

/// A checked option.
enum Checked {
    Name(String),
    Crate(Path),
    Setting(OptionValue),
}

/// The literal an expression is, seeing through invisible groups and parentheses.
fn literal(expr: &Expr) -> Option<&Lit> {
    match expr {
        Expr::Lit(lit) => Some(&lit.lit),
        Expr::Group(group) => literal(&group.expr),
        Expr::Paren(paren) => literal(&paren.expr),
        _ => None,
    }
}

/// An integer literal, possibly negated: `(literal, negative)`.
fn integer(expr: &Expr) -> Option<(&syn::LitInt, bool)> {
    match expr {
        Expr::Unary(unary) if matches!(unary.op, UnOp::Neg(_)) => match literal(&unary.expr) {
            Some(Lit::Int(int)) => Some((int, true)),
            _ => None,
        },
        Expr::Group(group) => integer(&group.expr),
        Expr::Paren(paren) => integer(&paren.expr),
        _ => match literal(expr) {
            Some(Lit::Int(int)) => Some((int, false)),
            _ => None,
        },
    }
}

/// A string literal.
fn string(expr: &Expr) -> Option<&LitStr> {
    match literal(expr) {
        Some(Lit::Str(s)) => Some(s),
        _ => None,
    }
}

/// Checks an option's value against its kind.
fn check_value(kind: Kind, key: &str, expr: &Expr) -> syn::Result<Checked> {
    let wrong = |what: &str| syn::Error::new_spanned(expr, format!("option `{key}` expects {what}"));
    match kind {
        Kind::WireName | Kind::ActorName => {
            let s = string(expr).ok_or_else(|| wrong("a string literal (an actor name)"))?;
            let value = s.value();
            if value.is_empty() {
                return Err(syn::Error::new(s.span(), "an actor name cannot be empty"));
            }
            Ok(if kind == Kind::WireName {
                Checked::Name(value)
            } else {
                Checked::Setting(OptionValue::Str(value))
            })
        }
        Kind::QueueName => {
            let s = string(expr).ok_or_else(|| wrong("a string literal (a queue name)"))?;
            let value = s.value();
            if !is_valid_queue_name(&value) {
                return Err(syn::Error::new(
                    s.span(),
                    format!(
                        "invalid queue name {value:?}: a queue name starts with a letter or `_` \
                         and contains only letters, digits, `.`, `_` and `-`"
                    ),
                ));
            }
            Ok(Checked::Setting(OptionValue::Str(value)))
        }
        Kind::Priority => {
            let (int, negative) = integer(expr)
                .ok_or_else(|| wrong(&format!("an integer literal from {PRIORITY_MIN} to {PRIORITY_MAX}")))?;
            let digits = if negative {
                format!("-{}", int.base10_digits())
            } else {
                int.base10_digits().to_owned()
            };
            // The range of troupe_core::priority (MIN..=MAX), which is troupe-options'.
            match digits.parse::<i32>() {
                Ok(value) if (PRIORITY_MIN..=PRIORITY_MAX).contains(&value) => {
                    Ok(Checked::Setting(OptionValue::I32(value)))
                }
                _ => Err(syn::Error::new_spanned(
                    expr,
                    format!(
                        "option `{key}` must be from {PRIORITY_MIN} to {PRIORITY_MAX} (lower runs first; 0 is the default)"
                    ),
                )),
            }
        }
        Kind::Count => {
            let (int, negative) = integer(expr).ok_or_else(|| wrong("a non-negative integer literal (a u64)"))?;
            if negative {
                return Err(wrong("a non-negative integer literal (a u64)"));
            }
            let value = int
                .base10_parse::<u64>()
                .map_err(|_| syn::Error::new_spanned(expr, format!("option `{key}` must fit in a u64")))?;
            Ok(Checked::Setting(OptionValue::U64(value)))
        }
        Kind::Duration => {
            let expects = "a duration: a string such as \"500ms\", \"30s\", \"5m\" or \"7days\", \
                           or an integer number of milliseconds";
            if let Some(s) = string(expr) {
                return parse_duration(&s.value())
                    .map(|ms| Checked::Setting(OptionValue::Millis(ms)))
                    .map_err(|reason| {
                        syn::Error::new(
                            s.span(),
                            format!("invalid duration for `{key}`: {reason}; expected {expects}"),
                        )
                    });
            }
            match integer(expr) {
                Some((int, false)) => {
                    let ms = int
                        .base10_parse::<u64>()
                        .map_err(|_| syn::Error::new_spanned(expr, format!("option `{key}` must fit in a u64")))?;
                    Ok(Checked::Setting(OptionValue::Millis(ms)))
                }
                _ => Err(wrong(expects)),
            }
        }
        Kind::Bool => match literal(expr) {
            Some(Lit::Bool(b)) => Ok(Checked::Setting(OptionValue::Bool(b.value))),
            _ => Err(wrong("`true` or `false`")),
        },
        Kind::Cron => {
            let s = string(expr).ok_or_else(|| wrong("a cron expression as a string, such as \"0 */5 * * * *\""))?;
            let value = s.value();
            match <cron::Schedule as std::str::FromStr>::from_str(&value) {
                Ok(_) => Ok(Checked::Setting(OptionValue::Str(value))),
                Err(e) => Err(syn::Error::new(
                    s.span(),
                    format!(
                        "invalid cron expression {value:?} for `{key}`: {e}; expected six or seven fields with seconds first, \
                         such as \"0 */5 * * * *\" (every five minutes)"
                    ),
                )),
            }
        }
        Kind::TimeZone => {
            let s =
                string(expr).ok_or_else(|| wrong("an IANA time zone name as a string, such as \"Europe/Paris\""))?;
            let value = s.value();
            match <chrono_tz::Tz as std::str::FromStr>::from_str(&value) {
                Ok(_) => Ok(Checked::Setting(OptionValue::Str(value))),
                Err(_) => Err(syn::Error::new(
                    s.span(),
                    format!(
                        "unknown time zone {value:?} for `{key}`; use an IANA name such as \"UTC\" or \"Europe/Paris\""
                    ),
                )),
            }
        }
        Kind::Missed => match string(expr).map(LitStr::value).as_deref() {
            Some("skip") => Ok(Checked::Setting(OptionValue::Missed(false))),
            Some("run_once") => Ok(Checked::Setting(OptionValue::Missed(true))),
            _ => Err(wrong("\"skip\" or \"run_once\"")),
        },
        Kind::CratePath => match expr {
            Expr::Path(path) if path.qself.is_none() && path.attrs.is_empty() => Ok(Checked::Crate(path.path.clone())),
            _ => {
                let s = string(expr).ok_or_else(|| wrong("a path as a string, such as \"::troupe\""))?;
                s.parse::<Path>().map(Checked::Crate).map_err(|_| {
                    syn::Error::new(
                        s.span(),
                        format!(
                            "option `crate` expects a path such as \"::troupe\", got {:?}",
                            s.value()
                        ),
                    )
                })
            }
        },
        // Closures are refused before (`not_in_macro`); a kind added to the table later needs
        // a check here first.
        _ => Err(syn::Error::new_spanned(
            expr,
            format!("option `{key}` cannot be set in `#[actor]`"),
        )),
    }
}

/// Whether `name` matches `[a-zA-Z_][a-zA-Z0-9._-]*` (as `troupe_core::queue` checks).
pub(crate) fn is_valid_queue_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {
            chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        }
        _ => false,
    }
}

/// Parses a humantime duration into whole milliseconds.
pub(crate) fn parse_duration(text: &str) -> Result<u64, String> {
    let duration = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if duration.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{text:?} is not a whole number of milliseconds"));
    }
    u64::try_from(duration.as_millis()).map_err(|_| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(tokens: TokenStream) -> syn::Result<ActorArgs> {
        parse_options(tokens)
    }

    fn messages(tokens: TokenStream) -> Vec<String> {
        match parse(tokens) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    /// Schedules are checked when the actor compiles.
    #[test]
    fn schedules_are_checked() {
        let errors = messages(quote!(cron = "*/5 * * * *"));
        assert!(
            errors[0].contains("invalid cron expression") && errors[0].contains("seconds first"),
            "{errors:?}"
        );
        let errors = messages(quote!(cron = "0 * * * * *", timezone = "Mars/Olympus"));
        assert!(errors[0].contains("unknown time zone"), "{errors:?}");
        let errors = messages(quote!(every = "1m", missed = "later"));
        assert!(errors[0].contains("\"skip\" or \"run_once\""), "{errors:?}");
        let args = parse(quote!(
            cron = "0 0 9 * * Mon-Fri",
            timezone = "Europe/Paris",
            missed = "run_once"
        ))
        .unwrap();
        let values = values(&args);
        assert_eq!(
            values[0],
            ("cron".to_owned(), OptionValue::Str("0 0 9 * * Mon-Fri".into()))
        );
        assert_eq!(values[2], ("missed".to_owned(), OptionValue::Missed(true)));
    }

    fn values(args: &ActorArgs) -> Vec<(String, OptionValue)> {
        args.settings
            .iter()
            .map(|s| (s.key.to_string(), s.value.clone()))
            .collect()
    }

    #[test]
    fn empty() {
        let args = parse(TokenStream::new()).unwrap();
        assert!(args.name.is_none());
        assert!(args.krate.is_none());
        assert!(args.settings.is_empty());
    }

    #[test]
    fn every_option() {
        let args = parse(quote!(
            name = "wire",
            queue_name = "math.q-1",
            priority = -5,
            max_retries = 3,
            min_backoff = "1s",
            max_backoff = 60000,
            time_limit = "5m",
            max_age = "7days",
            result_ttl = "500ms",
            store_results = true,
            pipe_ignore = false,
            notify_shutdown = true,
            on_success = "ok",
            on_failure = "ko",
            on_retry_exhausted = "dead",
            crate = "::renamed::inner",
        ))
        .unwrap();
        assert_eq!(args.name.as_deref(), Some("wire"));
        assert_eq!(
            args.krate.as_ref().unwrap().to_token_stream().to_string(),
            ":: renamed :: inner"
        );
        let expected: Vec<(String, OptionValue)> = vec![
            ("queue_name", OptionValue::Str("math.q-1".into())),
            ("priority", OptionValue::I32(-5)),
            ("max_retries", OptionValue::U64(3)),
            ("min_backoff", OptionValue::Millis(1000)),
            ("max_backoff", OptionValue::Millis(60_000)),
            ("time_limit", OptionValue::Millis(300_000)),
            ("max_age", OptionValue::Millis(7 * 24 * 3600 * 1000)),
            ("result_ttl", OptionValue::Millis(500)),
            ("store_results", OptionValue::Bool(true)),
            ("pipe_ignore", OptionValue::Bool(false)),
            ("notify_shutdown", OptionValue::Bool(true)),
            ("on_success", OptionValue::Str("ok".into())),
            ("on_failure", OptionValue::Str("ko".into())),
            ("on_retry_exhausted", OptionValue::Str("dead".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(values(&args), expected);
    }

    #[test]
    fn setter_calls() {
        let args = parse(quote!(queue_name = "q", time_limit = "2s", priority = 1)).unwrap();
        let krate: Path = syn::parse_quote!(::troupe);
        let calls: Vec<String> = args.settings.iter().map(|s| s.to_call(&krate).to_string()).collect();
        assert_eq!(
            calls,
            vec![
                ". queue_name (\"q\")",
                ". time_limit (:: troupe :: __private :: Duration :: from_millis (2000u64))",
                ". priority (1i32)",
            ]
        );
    }

    #[test]
    fn crate_as_a_bare_path() {
        let args = parse(quote!(crate = renamed)).unwrap();
        assert_eq!(args.krate.unwrap().to_token_stream().to_string(), "renamed");
    }

    #[test]
    fn unknown_option_lists_valid_ones() {
        let errors = messages(quote!(queue = "q"));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("unknown actor option `queue`"), "{}", errors[0]);
        assert!(
            errors[0].contains("valid options are: name, queue_name,"),
            "{}",
            errors[0]
        );
        assert!(errors[0].contains("did you mean `queue_name`?"), "{}", errors[0]);
        let errors = messages(quote!(max_retry = 3));
        assert!(errors[0].contains("did you mean `max_retries`?"), "{}", errors[0]);
        let errors = messages(quote!(retries = 3));
        assert!(errors[0].contains("did you mean `max_retries`?"), "{}", errors[0]);
        let errors = messages(quote!(timeout = 3));
        assert!(!errors[0].contains("did you mean"), "{}", errors[0]);
    }

    #[test]
    fn errors_accumulate() {
        let errors = messages(quote!(
            max_retries = "3",
            time_limit = "soon",
            queue_name = "9q",
            store_results = 1,
            max_retries = 4,
            bogus = 1,
            priority = 3000000000,
        ));
        assert_eq!(errors.len(), 7, "{errors:?}");
        assert!(errors[0].contains("`max_retries` expects a non-negative integer"));
        assert!(errors[1].starts_with("invalid duration for `time_limit`: \"soon\""));
        assert!(errors[2].starts_with("invalid queue name \"9q\""));
        assert!(errors[3].contains("`store_results` expects `true` or `false`"));
        assert_eq!(errors[4], "duplicate option `max_retries`");
        assert!(errors[5].starts_with("unknown actor option `bogus`"));
        assert!(errors[6].contains("must be from -10 to 10"), "{}", errors[6]);
    }

    #[test]
    fn priorities_are_in_range() {
        for ok in [quote!(priority = -10), quote!(priority = 10), quote!(priority = 0)] {
            assert!(parse(ok).is_ok());
        }
        for bad in [quote!(priority = 11), quote!(priority = -11), quote!(priority = "high")] {
            let errors = messages(bad);
            assert!(errors[0].contains("from -10 to 10"), "{errors:?}");
        }
    }

    /// Every option of the table that the macro takes parses, with a value of its kind: a kind
    /// added to troupe-options without a check here fails.
    #[test]
    fn every_table_option_parses() {
        for option in macro_options() {
            let value = match option.kind {
                Kind::WireName | Kind::ActorName => quote!("some_actor"),
                Kind::QueueName => quote!("some_queue"),
                Kind::Priority => quote!(-3),
                Kind::Count => quote!(3),
                Kind::Duration => quote!("30s"),
                Kind::Bool => quote!(true),
                Kind::CratePath => quote!(::troupe),
                Kind::Cron => quote!("0 */5 * * * *"),
                Kind::TimeZone => quote!("Europe/Paris"),
                Kind::Missed => quote!("run_once"),
                other => panic!(
                    "option `{}` has a kind the macro does not check: {other:?}",
                    option.name
                ),
            };
            let key = Ident::new(option.name, proc_macro2::Span::call_site());
            let parsed = parse(quote!(#key = #value));
            assert!(
                parsed.is_ok(),
                "{}: {:?}",
                option.name,
                parsed.err().map(|e| e.to_string())
            );
        }
    }

    #[test]
    fn closures_are_refused_with_a_pointer_to_actor_options() {
        let errors = messages(quote!(retry_when = "f", throws = 1));
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("option `retry_when` takes a closure, which `#[actor]` cannot express"),
            "{}",
            errors[0]
        );
        assert!(errors[0].contains("ActorOptions::retry_when"), "{}", errors[0]);
        assert!(errors[1].contains("ActorOptions::throws"), "{}", errors[1]);
        let unknown = messages(quote!(bogus = 1));
        assert!(
            !unknown[0].contains("retry_when"),
            "closures are not listed as valid: {}",
            unknown[0]
        );
    }

    /// The option tables of the macro's docs (src/lib.rs) and of the README are troupe-options'
    /// table, so they cannot drift from it.
    #[test]
    fn documented_tables_are_the_table() {
        let table = troupe_options::markdown_table();
        let rustdoc: String = table
            .lines()
            .map(|line| {
                if line.is_empty() {
                    "///\n".to_owned()
                } else {
                    format!("/// {line}\n")
                }
            })
            .collect();
        assert!(
            include_str!("lib.rs").contains(&rustdoc),
            "the `# Options` table in troupe-macros/src/lib.rs is not troupe_options::markdown_table(); \
             replace it with:\n{rustdoc}"
        );
        // The README is not packaged with this crate; in the workspace it must hold the table.
        if let Ok(readme) = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")) {
            assert!(
                readme.contains(&table),
                "the README's actor options table is not troupe_options::markdown_table(); replace it \
                 with:\n{table}"
            );
        }
    }

    #[test]
    fn missing_value() {
        let errors = messages(quote!(store_results));
        assert_eq!(
            errors,
            vec!["option `store_results` needs a value: write `store_results = true`"]
        );
    }

    #[test]
    fn syntax_error() {
        assert!(parse(quote!(queue_name "q")).is_err());
        assert!(parse(quote!(queue_name = )).is_err());
    }

    #[test]
    fn empty_names_are_rejected() {
        let errors = messages(quote!(name = "", on_success = ""));
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(1000));
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("5m"), Ok(300_000));
        assert_eq!(parse_duration("1h 30m"), Ok(5_400_000));
        assert_eq!(parse_duration("7days"), Ok(604_800_000));
        assert!(parse_duration("1500us").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        let errors = messages(quote!(min_backoff = -1));
        assert!(errors[0].contains("expects a duration"));
    }

    #[test]
    fn queue_names() {
        for ok in ["default", "_q", "a.b-c_d", "Q9"] {
            assert!(is_valid_queue_name(ok), "{ok}");
        }
        for bad in ["", "9q", "-q", "q q", "q/q", "é"] {
            assert!(!is_valid_queue_name(bad), "{bad}");
        }
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("queue", "queue_name"), 5);
        assert_eq!(edit_distance("max_retry", "max_retries"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
