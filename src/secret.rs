//! Owns the types that hold secrets (upstream keys, one-time tokens) so they cannot be printed by accident.

use std::fmt;

use http::HeaderValue;

/// A secret string. `Debug` and `Display` never show the content; the only way to read it
/// is [`Secret::expose`], which makes every use greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn new(value: impl Into<Box<str>>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The `Authorization: Bearer …` value for the upstream, marked sensitive so hyper's
    /// HPACK encoder never indexes it and `Debug` prints `Sensitive`.
    pub fn bearer_header(&self) -> Option<HeaderValue> {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.0)).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let secret = Secret::new("sk-live-very-secret");
        assert!(!format!("{secret:?}").contains("very-secret"));
        assert!(!format!("{secret}").contains("very-secret"));
        let header = secret.bearer_header().unwrap();
        assert!(header.is_sensitive());
        assert!(!format!("{header:?}").contains("very-secret"));
    }
}
