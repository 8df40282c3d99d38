//! The expansion of `#[actor]`, on `proc_macro2` so it can be tested.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::{FnArg, GenericArgument, Ident, Item, ItemFn, Pat, Path, PathArguments, ReturnType, Type};

use crate::options::{ActorArgs, parse_options, push_error};

/// Expands `#[actor(attr)] item`. On errors, emits the function unchanged with the errors, so
/// that the rest of the crate still type-checks against it.
pub(crate) fn actor(attr: TokenStream, item: TokenStream) -> TokenStream {
    let error = match syn::parse2::<Item>(item.clone()) {
        Ok(Item::Fn(item_fn)) => return expand_fn(attr, &item_fn),
        Ok(_) => syn::Error::new(
            Span::call_site(),
            "`#[actor]` applies to a free function (`fn` or `async fn`) with a body",
        ),
        Err(error) => error,
    };
    let mut out = error.to_compile_error();
    out.extend(item);
    out
}

/// Expands `#[actor(attr)]` on a function.
fn expand_fn(attr: TokenStream, item_fn: &ItemFn) -> TokenStream {
    let options = parse_options(attr);
    let analyzed = analyze(item_fn);
    match (options, analyzed) {
        (Ok(options), Ok(analyzed)) => generate(item_fn, &options, &analyzed),
        (options, analyzed) => {
            let mut errors = None;
            if let Err(e) = options {
                push_error(&mut errors, e);
            }
            if let Err(e) = analyzed {
                push_error(&mut errors, e);
            }
            let errors = errors.map(|e| e.to_compile_error());
            quote!(#item_fn #errors)
        }
    }
}

/// One parameter of the actor function.
struct Param {
    /// Its name, as written (without `mut`).
    ident: Ident,
    /// Its type.
    ty: Type,
}

/// What the function returns.
enum Returns {
    /// Nothing (or `()`).
    Unit,
    /// A value of this type.
    Value(Type),
    /// A `Result` whose `Ok` type is this.
    Result(Type),
}

/// The checked signature of the actor function.
struct Analyzed {
    params: Vec<Param>,
    returns: Returns,
    handle: Ident,
}

/// Checks the function's signature, reporting every problem found.
fn analyze(item_fn: &ItemFn) -> syn::Result<Analyzed> {
    let sig = &item_fn.sig;
    let mut errors = None;
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        let spanned: &dyn ToTokens = if sig.generics.params.is_empty() {
            &sig.generics.where_clause
        } else {
            &sig.generics
        };
        push_error(
            &mut errors,
            syn::Error::new_spanned(
                spanned,
                "an actor function cannot be generic: its arguments are decoded from messages \
                 into concrete types",
            ),
        );
    }
    if let Some(unsafety) = &sig.unsafety {
        push_error(
            &mut errors,
            syn::Error::new_spanned(unsafety, "an actor function cannot be `unsafe`"),
        );
    }
    if let Some(variadic) = &sig.variadic {
        push_error(
            &mut errors,
            syn::Error::new_spanned(variadic, "an actor function cannot be variadic"),
        );
    }
    let mut params = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(receiver) => push_error(
                &mut errors,
                syn::Error::new_spanned(
                    receiver,
                    "`#[actor]` cannot be used on a method: an actor is a free function without \
                     `self` (call the method from a free function instead)",
                ),
            ),
            FnArg::Typed(typed) => {
                let ident = match &*typed.pat {
                    Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => Some(pat.ident.clone()),
                    other => {
                        push_error(
                            &mut errors,
                            syn::Error::new_spanned(
                                other,
                                "actor parameters must be plain names (`x: T`): the names bind \
                                 the message's keyword arguments",
                            ),
                        );
                        None
                    }
                };
                let type_ok = match find_problem(&typed.ty) {
                    Some(problem) => {
                        push_error(&mut errors, problem.argument_error(&typed.ty));
                        false
                    }
                    None => true,
                };
                if let (Some(ident), true) = (ident, type_ok) {
                    params.push(Param {
                        ident,
                        ty: (*typed.ty).clone(),
                    });
                }
            }
        }
    }
    let returns = match &sig.output {
        ReturnType::Default => Returns::Unit,
        ReturnType::Type(_, ty) => {
            if let Some(problem) = find_problem(ty) {
                push_error(&mut errors, problem.return_error());
            }
            match &**ty {
                Type::Tuple(tuple) if tuple.elems.is_empty() => Returns::Unit,
                ty => match result_ok_type(ty) {
                    Some(ok) => Returns::Result(ok.clone()),
                    None => Returns::Value(ty.clone()),
                },
            }
        }
    };
    let fn_name = sig.ident.unraw().to_string();
    let handle_name = pascal_case(&fn_name);
    let handle = if handle_name == fn_name || handle_name == "Self" {
        push_error(
            &mut errors,
            syn::Error::new(
                sig.ident.span(),
                format!(
                    "the actor handle would be named `{handle_name}`, which cannot be used here; \
                     give the function a snake_case name"
                ),
            ),
        );
        None
    } else {
        Some(Ident::new(&handle_name, sig.ident.span()))
    };
    match (errors, handle) {
        (None, Some(handle)) => Ok(Analyzed {
            params,
            returns,
            handle,
        }),
        (Some(errors), _) => Err(errors),
        (None, None) => Err(syn::Error::new(sig.ident.span(), "invalid actor function name")),
    }
}

/// A type an actor cannot take or return.
enum Problem<'a> {
    /// A reference, somewhere in the type.
    Reference(&'a syn::TypeReference),
    /// An `impl Trait`, somewhere in the type.
    ImplTrait(&'a syn::TypeImplTrait),
}

impl Problem<'_> {
    /// The error for a parameter of type `ty`.
    fn argument_error(&self, ty: &Type) -> syn::Error {
        match self {
            Problem::Reference(reference) => {
                let top_level = matches!(ty, Type::Reference(top) if std::ptr::eq(top, *reference));
                let owned = top_level.then(|| match &*reference.elem {
                    Type::Path(p) if p.path.is_ident("str") => ("String".to_owned(), "&str".to_owned()),
                    Type::Slice(slice) => {
                        let elem = pretty(&slice.elem);
                        (format!("Vec<{elem}>"), format!("&[{elem}]"))
                    }
                    elem => {
                        let elem = pretty(elem);
                        (elem.clone(), format!("&{elem}"))
                    }
                });
                let message = match owned {
                    Some((owned, borrowed)) => format!(
                        "actor arguments must be owned (they are decoded from the message): \
                         use `{owned}` instead of `{borrowed}`"
                    ),
                    None => "actor arguments must be owned (they are decoded from the message): \
                             replace this reference with an owned type"
                        .to_owned(),
                };
                syn::Error::new_spanned(reference, message)
            }
            Problem::ImplTrait(impl_trait) => syn::Error::new_spanned(
                impl_trait,
                "actor arguments cannot be `impl Trait`: use a concrete type, which the message \
                 is decoded into",
            ),
        }
    }

    /// The error for a return type.
    fn return_error(&self) -> syn::Error {
        match self {
            Problem::Reference(reference) => syn::Error::new_spanned(
                reference,
                "an actor must return an owned value (it is serialised as the result): replace \
                 this reference with an owned type",
            ),
            Problem::ImplTrait(impl_trait) => {
                syn::Error::new_spanned(impl_trait, "an actor cannot return `impl Trait`: use a concrete type")
            }
        }
    }
}

/// The first reference or `impl Trait` in `ty`.
fn find_problem(ty: &Type) -> Option<Problem<'_>> {
    match ty {
        Type::Reference(reference) => Some(Problem::Reference(reference)),
        Type::ImplTrait(impl_trait) => Some(Problem::ImplTrait(impl_trait)),
        Type::Array(array) => find_problem(&array.elem),
        Type::Group(group) => find_problem(&group.elem),
        Type::Paren(paren) => find_problem(&paren.elem),
        Type::Ptr(ptr) => find_problem(&ptr.elem),
        Type::Slice(slice) => find_problem(&slice.elem),
        Type::Tuple(tuple) => tuple.elems.iter().find_map(find_problem),
        Type::Path(path) => path
            .qself
            .as_ref()
            .and_then(|q| find_problem(&q.ty))
            .or_else(|| path.path.segments.iter().find_map(|s| arguments_problem(&s.arguments))),
        _ => None,
    }
}

/// The first reference or `impl Trait` in a path segment's generic arguments.
fn arguments_problem(arguments: &PathArguments) -> Option<Problem<'_>> {
    match arguments {
        PathArguments::None => None,
        PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
            GenericArgument::Type(ty) => find_problem(ty),
            GenericArgument::AssocType(assoc) => find_problem(&assoc.ty),
            _ => None,
        }),
        PathArguments::Parenthesized(args) => {
            args.inputs
                .iter()
                .find_map(find_problem)
                .or_else(|| match &args.output {
                    ReturnType::Type(_, ty) => find_problem(ty),
                    ReturnType::Default => None,
                })
        }
    }
}

/// A type as a user would write it (`Vec<u8>`, not `Vec < u8 >`), for messages.
fn pretty(ty: &Type) -> String {
    ty.to_token_stream()
        .to_string()
        .replace(" :: ", "::")
        .replace(":: ", "::")
        .replace(" <", "<")
        .replace("< ", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
        .replace("& ", "&")
}

/// `T` when `ty` is a path ending in `Result<T, ...>`.
fn result_ok_type(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = ty else {
        return None;
    };
    if path.qself.is_some() {
        return None;
    }
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(ok) => Some(ok),
        _ => None,
    }
}

/// `send_welcome` -> `SendWelcome`. Leading, trailing and doubled underscores disappear; a
/// name that would start with a digit gets an `Actor` prefix.
pub(crate) fn pascal_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for part in name.split('_').filter(|p| !p.is_empty()) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.push_str(chars.as_str());
        }
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "Actor");
    }
    out
}

/// `base`, or `base` with underscores appended, so it differs from every parameter name.
fn fresh(base: &str, params: &[Param]) -> Ident {
    let mut name = base.to_owned();
    while params.iter().any(|p| p.ident.unraw() == name) {
        name.push('_');
    }
    Ident::new(&name, Span::call_site())
}

/// The generated code for a checked actor function.
fn generate(item_fn: &ItemFn, options: &ActorArgs, analyzed: &Analyzed) -> TokenStream {
    let default_krate: Path = syn::parse_quote!(::troupe);
    let krate = options.krate.as_ref().unwrap_or(&default_krate);
    let p = quote!(#krate::__private);
    let vis = &item_fn.vis;
    let fn_ident = &item_fn.sig.ident;
    let fn_name = fn_ident.unraw().to_string();
    let handle = &analyzed.handle;
    let wire_name = options.name.clone().unwrap_or_else(|| fn_name.clone());

    let idents: Vec<&Ident> = analyzed.params.iter().map(|p| &p.ident).collect();
    let names: Vec<String> = idents.iter().map(|i| i.unraw().to_string()).collect();
    let types: Vec<&Type> = analyzed.params.iter().map(|p| &p.ty).collect();
    let positions = 0..analyzed.params.len();
    let count = analyzed.params.len();
    let locals: Vec<Ident> = (0..count)
        .map(|i| format_ident!("__troupe_arg{}", i, span = Span::mixed_site()))
        .collect();
    // Spanned on the parameter list, so that an argument type that does not serialise is
    // reported there rather than on the attribute.
    let params_span = item_fn.sig.paren_token.span.join();
    let args_type = quote_spanned!(params_span=> (#(#types,)*));
    let args_tuple = quote!((#(#idents,)*));
    let output = match &analyzed.returns {
        Returns::Unit => quote!(()),
        Returns::Value(ty) | Returns::Result(ty) => ty.to_token_stream(),
    };
    let settings = options.settings.iter().map(|s| s.to_call(krate));

    let invoke = quote!(#fn_ident(#(#locals),*));
    let invoke = if item_fn.sig.asyncness.is_some() {
        quote!(#invoke.await)
    } else {
        invoke
    };
    let body = match &analyzed.returns {
        Returns::Unit => quote! {
            #invoke;
            ::core::result::Result::Ok(())
        },
        Returns::Value(_) => quote!(::core::result::Result::Ok(#invoke)),
        Returns::Result(_) => quote! {
            ::core::result::Result::map_err(#invoke, ::core::convert::Into::<#p::ActorError>::into)
        },
    };
    let call_body = if item_fn.sig.asyncness.is_some() {
        body
    } else {
        quote!(#p::run_blocking(move || { #body }).await)
    };

    let values = Ident::new("values", Span::mixed_site());
    let app = fresh("app", &analyzed.params);
    let send_options = fresh("options", &analyzed.params);

    let kind = if item_fn.sig.asyncness.is_some() {
        "async fn"
    } else {
        "fn"
    };
    let handle_doc = format!(
        " The actor handle of `{kind} {fn_name}` (wire name `{wire_name:?}`), generated by \
         `#[actor]`.\n\n Register it with `AppBuilder::actor` and send it messages with \
         [`{handle}::send`]."
    );
    let send_doc = format!(
        " Sends a message to the `{wire_name}` actor through `app`, to be run by a worker.\
         \n\n # Errors\n An invalid queue name, a middleware refusal, an oversized message or \
         a broker error."
    );
    let send_with_options_doc = format!(
        " Sends a message to the `{wire_name}` actor through `app` with per-message options \
         (delay, priority, ...).\n\n # Errors\n As [`{handle}::send`]."
    );
    let send_many_doc = format!(
        " Sends one message to the `{wire_name}` actor per item of `calls` (argument tuples), \
         in one broker call where the backend allows.\n\n # Errors\n As [`{handle}::send`]."
    );
    let message_doc = format!(
        " The message calling the `{wire_name}` actor with these arguments, without sending \
         it (for pipelines and groups).\n\n # Errors\n When the arguments cannot be serialised."
    );

    quote! {
        #item_fn

        #[doc = #handle_doc]
        #[derive(::core::fmt::Debug, ::core::clone::Clone, ::core::marker::Copy, ::core::default::Default)]
        #vis struct #handle;

        const _: () = {
            impl #p::Actor for #handle {
                type Args = #args_type;
                type Output = #output;

                fn name(&self) -> &str {
                    #wire_name
                }

                fn arg_names(&self) -> &[&str] {
                    &[#(#names),*]
                }

                fn options(&self) -> #p::ActorOptions {
                    #p::ActorOptions::new() #(#settings)*
                }

                fn decode_args(
                    &self,
                    #values: ::std::vec::Vec<#p::Value>,
                ) -> ::core::result::Result<Self::Args, ::std::string::String> {
                    if #values.len() > #count {
                        return ::core::result::Result::Err(::std::format!(
                            "takes {} positional argument(s) but {} were given",
                            #count,
                            #values.len(),
                        ));
                    }
                    #[allow(unused_mut, unused_variables)]
                    let mut #values = ::core::iter::IntoIterator::into_iter(#values);
                    ::core::result::Result::Ok((
                        #(#p::decode_arg::<#types>(
                            ::core::iter::Iterator::next(&mut #values),
                            #names,
                            #positions,
                        )?,)*
                    ))
                }

                async fn call(
                    &self,
                    (#(#locals,)*): Self::Args,
                ) -> ::core::result::Result<Self::Output, #p::ActorError> {
                    #call_body
                }
            }

            impl #handle {
                #[doc = #send_doc]
                #[allow(dead_code)]
                pub async fn send(
                    &self,
                    #app: &#p::App,
                    #(#idents: #types),*
                ) -> #p::Result<#p::Sent<#output>> {
                    #p::App::send(#app, self, #args_tuple).await
                }

                #[doc = #send_with_options_doc]
                #[allow(dead_code)]
                pub async fn send_with_options(
                    &self,
                    #app: &#p::App,
                    #(#idents: #types,)*
                    #send_options: #p::SendOptions,
                ) -> #p::Result<#p::Sent<#output>> {
                    #p::App::send_with_options(#app, self, #args_tuple, #send_options).await
                }

                #[doc = #send_many_doc]
                #[allow(dead_code)]
                pub async fn send_many(
                    &self,
                    #app: &#p::App,
                    calls: impl ::core::iter::IntoIterator<Item = #args_type>,
                ) -> #p::Result<::std::vec::Vec<#p::Sent<#output>>> {
                    #p::App::send_many(#app, self, calls).await
                }

                #[doc = #message_doc]
                #[allow(dead_code)]
                pub fn message(&self, #(#idents: #types),*) -> #p::Result<#p::Message> {
                    #p::App::message(self, &#args_tuple)
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(attr: TokenStream, item: TokenStream) -> String {
        actor(attr, item).to_string()
    }

    fn errors(item: TokenStream) -> Vec<String> {
        let item_fn: ItemFn = syn::parse2(item).unwrap();
        match analyze(&item_fn) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn pascal_case_names() {
        assert_eq!(pascal_case("send_welcome"), "SendWelcome");
        assert_eq!(pascal_case("add"), "Add");
        assert_eq!(pascal_case("_private_thing"), "PrivateThing");
        assert_eq!(pascal_case("a__b_"), "AB");
        assert_eq!(pascal_case("add_2"), "Add2");
        assert_eq!(pascal_case("fetchURL"), "FetchURL");
        assert_eq!(pascal_case("_1"), "Actor1");
        assert_eq!(pascal_case("__"), "Actor");
        assert_eq!(pascal_case("été_chaud"), "ÉtéChaud");
    }

    #[test]
    fn expands_an_async_actor() {
        let out = expand(
            quote!(queue_name = "math", max_retries = 3),
            quote!(
                async fn add(x: i64, y: i64) -> i64 {
                    x + y
                }
            ),
        );
        assert!(
            out.starts_with("async fn add (x : i64 , y : i64) -> i64 { x + y }"),
            "{out}"
        );
        assert!(out.contains("struct Add ;"), "{out}");
        assert!(out.contains("type Args = (i64 , i64 ,) ;"), "{out}");
        assert!(out.contains("type Output = i64 ;"), "{out}");
        assert!(out.contains("\"add\""), "{out}");
        assert!(out.contains("& [\"x\" , \"y\"]"), "{out}");
        assert!(
            out.contains(
                ":: troupe :: __private :: ActorOptions :: new () . queue_name (\"math\") . max_retries (3u64)"
            ),
            "{out}"
        );
        assert!(
            out.contains("Ok (add (__troupe_arg0 , __troupe_arg1) . await)"),
            "{out}"
        );
        assert!(!out.contains("run_blocking"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn expands_a_sync_fallible_actor() {
        let out = expand(
            quote!(name = "parse", crate = "::renamed"),
            quote!(
                pub fn parse_number(text: String) -> Result<i64, std::num::ParseIntError> {
                    text.parse()
                }
            ),
        );
        assert!(out.contains("pub struct ParseNumber ;"), "{out}");
        assert!(out.contains("type Args = (String ,) ;"), "{out}");
        assert!(out.contains("type Output = i64 ;"), "{out}");
        assert!(
            out.contains(":: renamed :: __private :: run_blocking (move ||"),
            "{out}"
        );
        assert!(
            out.contains("Into :: < :: renamed :: __private :: ActorError > :: into"),
            "{out}"
        );
        assert!(out.contains("fn name (& self) -> & str { \"parse\" }"), "{out}");
        assert!(!out.contains(":: troupe ::"), "{out}");
    }

    #[test]
    fn expands_a_unit_actor_without_arguments() {
        let out = expand(
            TokenStream::new(),
            quote!(
                async fn tick() {}
            ),
        );
        assert!(out.contains("type Args = () ;"), "{out}");
        assert!(out.contains("type Output = () ;"), "{out}");
        assert!(out.contains("tick () . await ;"), "{out}");
    }

    #[test]
    fn avoids_parameter_names() {
        let out = expand(
            TokenStream::new(),
            quote!(
                async fn f(app: String, options: u8) {}
            ),
        );
        assert!(out.contains("app_ : &"), "{out}");
        assert!(out.contains("options_ :"), "{out}");
    }

    #[test]
    fn errors_keep_the_function() {
        let out = expand(
            quote!(bogus = 1),
            quote!(
                async fn add<T>(x: &str) {}
            ),
        );
        assert!(out.starts_with("async fn add < T > (x : & str) { }"), "{out}");
        assert_eq!(out.matches("compile_error").count(), 3, "{out}");
        assert!(!out.contains("struct"), "{out}");
    }

    #[test]
    fn not_a_function() {
        let out = expand(
            TokenStream::new(),
            quote!(
                struct S;
            ),
        );
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("struct S ;"), "{out}");
    }

    #[test]
    fn signature_errors() {
        let e = errors(quote!(
            fn f(&self) {}
        ));
        assert!(e[0].contains("cannot be used on a method"), "{e:?}");
        let e = errors(quote!(
            fn f(x: &str, y: &[u8], z: &Vec<u8>, w: Vec<&str>) {}
        ));
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e[0].ends_with("use `String` instead of `&str`"), "{e:?}");
        assert!(e[1].ends_with("use `Vec<u8>` instead of `&[u8]`"), "{e:?}");
        assert!(e[2].ends_with("use `Vec<u8>` instead of `&Vec<u8>`"), "{e:?}");
        assert!(e[3].ends_with("replace this reference with an owned type"), "{e:?}");
        let e = errors(quote!(
            fn f(x: impl Into<String>) {}
        ));
        assert!(e[0].contains("cannot be `impl Trait`"), "{e:?}");
        let e = errors(quote!(
            fn f((a, b): (u8, u8), _: u8) {}
        ));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("actor parameters must be plain names"), "{e:?}");
        let e = errors(quote!(
            fn f<T>(x: T) {}
        ));
        assert!(e[0].contains("cannot be generic"), "{e:?}");
        let e = errors(quote!(
            fn f()
            where
                u8: Copy,
            {
            }
        ));
        assert!(e[0].contains("cannot be generic"), "{e:?}");
        let e = errors(quote!(
            fn f() -> &'static str {
                ""
            }
        ));
        assert!(e[0].contains("must return an owned value"), "{e:?}");
        let e = errors(quote!(
            unsafe fn f() {}
        ));
        assert!(e[0].contains("`unsafe`"), "{e:?}");
        let e = errors(quote!(
            fn Add() {}
        ));
        assert!(e[0].contains("snake_case"), "{e:?}");
    }

    #[test]
    fn return_types() {
        let returns = |item: TokenStream| {
            let item_fn: ItemFn = syn::parse2(item).unwrap();
            match analyze(&item_fn).unwrap().returns {
                Returns::Unit => "unit".to_owned(),
                Returns::Value(t) => format!("value {}", t.to_token_stream()),
                Returns::Result(t) => format!("result {}", t.to_token_stream()),
            }
        };
        assert_eq!(
            returns(quote!(
                fn f() {}
            )),
            "unit"
        );
        assert_eq!(
            returns(quote!(
                fn f() -> () {}
            )),
            "unit"
        );
        assert_eq!(
            returns(quote!(
                fn f() -> u8 {
                    0
                }
            )),
            "value u8"
        );
        assert_eq!(
            returns(quote!(
                fn f() -> Result<u8, E> {
                    0
                }
            )),
            "result u8"
        );
        assert_eq!(
            returns(quote!(
                fn f() -> io::Result<Vec<u8>> {
                    0
                }
            )),
            "result Vec < u8 >"
        );
        assert_eq!(
            returns(quote!(
                fn f() -> Option<u8> {
                    0
                }
            )),
            "value Option < u8 >"
        );
    }

    #[test]
    fn keeps_raw_and_mut_names() {
        let item_fn: ItemFn = syn::parse2(quote!(
            async fn r#move(mut r#type: u8) {}
        ))
        .unwrap();
        let analyzed = analyze(&item_fn).unwrap();
        assert_eq!(analyzed.handle.to_string(), "Move");
        let out = expand(
            TokenStream::new(),
            quote!(
                async fn r#move(mut r#type: u8) {}
            ),
        );
        assert!(out.contains("& [\"type\"]"), "{out}");
        assert!(out.contains("\"move\""), "{out}");
    }
}
