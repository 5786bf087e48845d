//! `Secret`: a string (password, token, key, database URL) that never appears in Debug output or logs.

use serde::Deserialize;
use std::fmt;

/// A string that must not be logged. `expose` is the one way to read it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(not set)"
        } else {
            "Secret(set)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_value() {
        let s = Secret::new("hunter2-password");
        assert_eq!(format!("{s:?}"), "Secret(set)");
        assert_eq!(format!("{:?}", Secret::default()), "Secret(not set)");
    }
}
