//! An ordered middleware list with lookups by type.

use std::any::TypeId;
use std::fmt;
use std::sync::Arc;

use super::Middleware;
use crate::error::{Error, Result};

/// An ordered list of middleware, outermost first, in which a middleware is found by its type
/// (through `Arc` and `Box`), so one can be put before or after a built-in one, or replace it,
/// without rebuilding the list.
///
/// ```
/// # use std::time::Duration;
/// use troupe_core::middleware::{self, MiddlewareStack, Retries, TimeLimit};
///
/// # #[derive(Debug)] struct Audit;
/// # impl troupe_core::Middleware for Audit {}
/// let mut stack: MiddlewareStack = middleware::defaults();
/// // Outside Retries: sees each attempt after Retries handled it.
/// stack.insert_before::<Retries>(Audit)?;
/// stack.replace::<TimeLimit>(TimeLimit::new(Duration::from_secs(30)))?;
/// assert_eq!(stack.position::<Audit>(), Some(stack.len() - 2));
/// # Ok::<(), troupe_core::Error>(())
/// ```
///
/// An app starts from [`middleware::defaults`](super::defaults); the app builder places
/// middleware in it by type too (`AppBuilder::middleware_before`, `middleware_after`,
/// `replace_middleware`, `retries`).
#[derive(Clone, Default)]
pub struct MiddlewareStack {
    list: Vec<Arc<dyn Middleware>>,
}

impl fmt::Debug for MiddlewareStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.list).finish()
    }
}

/// The short name of `T` for messages: its last path segment, without generic arguments.
fn type_label<T: ?Sized>() -> &'static str {
    let full = std::any::type_name::<T>();
    let path = full.split('<').next().unwrap_or(full);
    path.rsplit("::").next().unwrap_or(path)
}

impl MiddlewareStack {
    /// An empty list (no middleware at all: see [`middleware::defaults`](super::defaults)).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `middleware` (innermost: it runs inside every one before it).
    pub fn push(&mut self, middleware: impl Middleware) {
        self.list.push(Arc::new(middleware));
    }

    /// Appends an already shared middleware.
    pub fn push_arc(&mut self, middleware: Arc<dyn Middleware>) {
        self.list.push(middleware);
    }

    /// Puts an already shared middleware first (outermost: it sees what every other did).
    pub fn push_front_arc(&mut self, middleware: Arc<dyn Middleware>) {
        self.list.insert(0, middleware);
    }

    /// Where the first middleware of type `T` is (0: outermost).
    #[must_use]
    pub fn position<T: Middleware>(&self) -> Option<usize> {
        let wanted = TypeId::of::<T>();
        self.list.iter().position(|m| (**m).middleware_type() == wanted)
    }

    /// Whether a middleware of type `T` is in the list.
    #[must_use]
    pub fn contains<T: Middleware>(&self) -> bool {
        self.position::<T>().is_some()
    }

    fn anchor<T: Middleware>(&self, what: &str) -> Result<usize> {
        self.position::<T>().ok_or_else(|| {
            Error::Config(format!(
                "cannot {what} {}: the middleware list has none ({self:?})",
                type_label::<T>()
            ))
        })
    }

    /// Inserts `middleware` just before (outside) the first `T`.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no `T`.
    pub fn insert_before<T: Middleware>(&mut self, middleware: impl Middleware) -> Result<()> {
        self.insert_arc_before::<T>(Arc::new(middleware))
    }

    /// [`insert_before`](Self::insert_before) for an already shared middleware.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no `T`.
    pub fn insert_arc_before<T: Middleware>(&mut self, middleware: Arc<dyn Middleware>) -> Result<()> {
        let at = self.anchor::<T>("insert a middleware before")?;
        self.list.insert(at, middleware);
        Ok(())
    }

    /// Inserts `middleware` just after (inside) the first `T`.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no `T`.
    pub fn insert_after<T: Middleware>(&mut self, middleware: impl Middleware) -> Result<()> {
        self.insert_arc_after::<T>(Arc::new(middleware))
    }

    /// [`insert_after`](Self::insert_after) for an already shared middleware.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no `T`.
    pub fn insert_arc_after<T: Middleware>(&mut self, middleware: Arc<dyn Middleware>) -> Result<()> {
        let at = self.anchor::<T>("insert a middleware after")?;
        self.list.insert(at + 1, middleware);
        Ok(())
    }

    /// Replaces the first `T` with `middleware`, in its place; returns the one replaced.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no `T`.
    pub fn replace<T: Middleware>(&mut self, middleware: impl Middleware) -> Result<Arc<dyn Middleware>> {
        self.replace_arc::<T>(Arc::new(middleware))
    }

    /// [`replace`](Self::replace) with an already shared middleware.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no `T`.
    pub fn replace_arc<T: Middleware>(&mut self, middleware: Arc<dyn Middleware>) -> Result<Arc<dyn Middleware>> {
        let at = self.anchor::<T>("replace")?;
        Ok(std::mem::replace(&mut self.list[at], middleware))
    }

    /// Removes the first `T`, if any, and returns it.
    pub fn remove<T: Middleware>(&mut self) -> Option<Arc<dyn Middleware>> {
        let at = self.position::<T>()?;
        Some(self.list.remove(at))
    }

    /// The middleware, outermost first.
    #[must_use]
    pub fn as_slice(&self) -> &[Arc<dyn Middleware>] {
        &self.list
    }

    /// The middleware, outermost first.
    pub fn iter(&self) -> std::slice::Iter<'_, Arc<dyn Middleware>> {
        self.list.iter()
    }

    /// How many middleware there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there is none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The list, outermost first.
    #[must_use]
    pub fn into_vec(self) -> Vec<Arc<dyn Middleware>> {
        self.list
    }
}

impl From<Vec<Arc<dyn Middleware>>> for MiddlewareStack {
    fn from(list: Vec<Arc<dyn Middleware>>) -> Self {
        Self { list }
    }
}

impl From<MiddlewareStack> for Vec<Arc<dyn Middleware>> {
    fn from(stack: MiddlewareStack) -> Self {
        stack.list
    }
}

impl<'a> IntoIterator for &'a MiddlewareStack {
    type Item = &'a Arc<dyn Middleware>;
    type IntoIter = std::slice::Iter<'a, Arc<dyn Middleware>>;

    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::middleware::{AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit, defaults};

    #[derive(Debug)]
    struct Marker(#[allow(dead_code)] &'static str); // read through Debug

    impl Middleware for Marker {}

    /// The list's types, by short name (a `Marker` by its label).
    fn names(stack: &MiddlewareStack) -> Vec<String> {
        stack
            .iter()
            .map(|m| {
                let text = format!("{m:?}");
                let name = text.split(['(', ' ', '{']).next().unwrap_or_default().to_owned();
                if name == "Marker" { text } else { name }
            })
            .collect()
    }

    #[test]
    fn defaults_are_dramatiqs_order() {
        let stack = defaults();
        assert_eq!(
            names(&stack),
            [
                "AgeLimit",
                "TimeLimit",
                "ShutdownNotifications",
                "Callbacks",
                "Pipelines",
                "Retries"
            ]
        );
        assert_eq!(stack.position::<AgeLimit>(), Some(0));
        assert_eq!(stack.position::<ShutdownNotifications>(), Some(2));
        assert_eq!(stack.position::<Callbacks>(), Some(3));
        assert_eq!(stack.position::<Pipelines>(), Some(4));
        assert_eq!(stack.position::<Retries>(), Some(5));
        assert!(!stack.contains::<Marker>());
    }

    #[test]
    fn places_by_type() {
        let mut stack = defaults();
        stack.insert_before::<Retries>(Marker("outside")).unwrap();
        stack.insert_after::<Retries>(Marker("inside")).unwrap();
        stack.insert_before::<AgeLimit>(Marker("first")).unwrap();
        assert_eq!(
            names(&stack),
            [
                "Marker(\"first\")",
                "AgeLimit",
                "TimeLimit",
                "ShutdownNotifications",
                "Callbacks",
                "Pipelines",
                "Marker(\"outside\")",
                "Retries",
                "Marker(\"inside\")",
            ]
        );
        assert_eq!(stack.position::<Marker>(), Some(0), "the first of a type");

        let old = stack
            .replace::<TimeLimit>(TimeLimit::new(Duration::from_secs(1)))
            .unwrap();
        assert!(format!("{old:?}").contains("600s"), "{old:?}");
        assert_eq!(stack.position::<TimeLimit>(), Some(2), "replaced in place");
        assert!(format!("{:?}", stack.as_slice()[2]).contains("1s"));

        assert!(stack.remove::<Callbacks>().is_some());
        assert!(stack.remove::<Callbacks>().is_none());
        assert_eq!(stack.len(), 8);
    }

    #[test]
    fn finds_through_arc_and_box() {
        let mut stack = MiddlewareStack::new();
        assert!(stack.is_empty());
        let shared = Arc::new(Retries::default());
        stack.push(Arc::clone(&shared));
        stack.push(Box::new(TimeLimit::default()));
        stack.push_arc(Arc::new(Pipelines) as Arc<dyn Middleware>);
        stack.push(Arc::new(AgeLimit::default()) as Arc<dyn Middleware>);
        assert_eq!(stack.position::<Retries>(), Some(0));
        assert_eq!(stack.position::<TimeLimit>(), Some(1));
        assert_eq!(stack.position::<Pipelines>(), Some(2));
        assert_eq!(
            stack.position::<AgeLimit>(),
            Some(3),
            "an Arc<dyn Middleware> in an Arc"
        );
    }

    #[test]
    fn a_missing_anchor_is_an_error_naming_it() {
        let mut stack = MiddlewareStack::from(vec![Arc::new(Pipelines) as Arc<dyn Middleware>]);
        let err = stack.insert_before::<Retries>(Marker("x")).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        assert!(err.to_string().contains("before Retries"), "{err}");
        assert!(stack.insert_after::<Retries>(Marker("x")).is_err());
        assert!(stack.replace::<Retries>(Retries::default()).is_err());
        assert_eq!(Vec::from(stack).len(), 1, "nothing inserted");
    }
}
