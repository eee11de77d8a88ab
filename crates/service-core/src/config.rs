//! Typed configuration from defaults, a TOML file and environment variables.
//!
//! Every service describes its whole configuration as one `serde` struct with defaults that run the local stack.
//! [`load`] layers, lowest precedence first: the struct's `Default`, the TOML file (if one is named), then the
//! environment variables that start with the service's prefix. Nested keys are separated by a double underscore:
//! `GATEWAY_KAFKA__BROKERS=host:9092` sets `kafka.brokers`. `{prefix}CONFIG` names the file and is not a key.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
}

/// Loads a service's configuration: defaults, then `file` (must exist when given), then `{prefix}*` variables.
pub fn load<T>(file: Option<&Path>, env_prefix: &str) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::Missing(path.to_path_buf()));
        }
        figment = figment.merge(Toml::file(path));
    }
    // `{prefix}CONFIG` names the file (the binaries' `--config`); it is not a key.
    let env = Env::prefixed(env_prefix).filter(|key| key != "config").split("__");
    figment.merge(env).extract().map_err(|e| ConfigError::Invalid(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        listen: String,
        inner: Inner,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Inner {
        brokers: String,
        retries: u32,
    }

    impl Default for Sample {
        fn default() -> Self {
            Self { listen: "127.0.0.1:1".into(), inner: Inner::default() }
        }
    }

    impl Default for Inner {
        fn default() -> Self {
            Self { brokers: "default:9092".into(), retries: 3 }
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail dictates the closure's error type
    fn file_overrides_defaults_and_env_overrides_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:2\"\n[inner]\nretries = 7\n").expect("write");
        figment::Jail::expect_with(|jail| {
            jail.set_env("SAMPLETEST_INNER__BROKERS", "env:1");
            jail.set_env("SAMPLETEST_CONFIG", "ignored, it names the file");
            let c: Sample = load(Some(&path), "SAMPLETEST_").map_err(|e| e.to_string())?;
            assert_eq!(c.listen, "127.0.0.1:2");
            assert_eq!(c.inner.retries, 7);
            assert_eq!(c.inner.brokers, "env:1");
            Ok(())
        });
    }

    #[test]
    fn a_named_file_that_is_missing_is_an_error() {
        let err = load::<Sample>(Some(Path::new("/nonexistent/x.toml")), "X_").unwrap_err();
        assert!(matches!(err, ConfigError::Missing(_)), "{err}");
    }

    #[test]
    fn a_wrongly_typed_value_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[inner]\nretries = \"many\"\n").expect("write");
        let err = load::<Sample>(Some(&path), "NOPE_").unwrap_err().to_string();
        assert!(err.contains("retries"), "{err}");
    }
}
