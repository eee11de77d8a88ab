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

/// A librdkafka property name from a configuration key: `_` stands for `.` (librdkafka names have no `_`), so that
/// `SERVICE_KAFKA__PROPERTIES__BATCH_NUM_MESSAGES=1` sets `batch.num.messages` from the environment.
pub fn kafka_property_name(key: &str) -> String {
    key.replace('_', ".")
}

/// Deserializes a map of librdkafka properties whose values may be any scalar: environment variables are
/// parsed into numbers and booleans (`..._BATCH_NUM_MESSAGES=1`), librdkafka wants text.
pub fn scalar_map<'de, D>(d: D) -> Result<std::collections::BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    let raw: std::collections::BTreeMap<String, Scalar> = serde::Deserialize::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::Text(s) => s,
                Scalar::Int(i) => i.to_string(),
                Scalar::Float(f) => f.to_string(),
                Scalar::Bool(b) => b.to_string(),
            };
            (k, v)
        })
        .collect())
}

/// The librdkafka configuration every client of a service starts from: `bootstrap.servers`, then the
/// `kafka.properties` of its configuration (feature `kafka`).
#[cfg(feature = "kafka")]
pub fn kafka_client(brokers: &str, properties: &std::collections::BTreeMap<String, String>) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        c.set(kafka_property_name(k), v);
    }
    c
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

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct WithProps {
        #[serde(deserialize_with = "scalar_map")]
        properties: std::collections::BTreeMap<String, String>,
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail dictates the closure's error type
    fn kafka_properties_from_the_environment_are_text_with_dotted_names() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PROPTEST_PROPERTIES__BATCH_NUM_MESSAGES", "1");
            jail.set_env("PROPTEST_PROPERTIES__ENABLE_SSL_CERTIFICATE_VERIFICATION", "false");
            jail.set_env("PROPTEST_PROPERTIES__SECURITY_PROTOCOL", "SASL_SSL");
            let c: WithProps = load(None, "PROPTEST_").map_err(|e| e.to_string())?;
            let named: Vec<(String, &str)> =
                c.properties.iter().map(|(k, v)| (kafka_property_name(k), v.as_str())).collect();
            assert_eq!(
                named,
                [
                    ("batch.num.messages".to_owned(), "1"),
                    ("enable.ssl.certificate.verification".to_owned(), "false"),
                    ("security.protocol".to_owned(), "SASL_SSL"),
                ]
            );
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
