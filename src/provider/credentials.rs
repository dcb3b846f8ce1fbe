//! A provider's API keys as ready-made header values, marked sensitive so that no debug output
//! of a request shows them.

use http::HeaderValue;

use super::InvalidBackend;
use crate::chain::CompiledProvider;

/// One header value per key of a provider; none for a keyless endpoint.
#[derive(Debug, Default)]
pub struct Credentials {
    values: Vec<HeaderValue>,
}

impl Credentials {
    /// Header values `prefix` + key for each of the provider's keys.
    pub fn new(config: &CompiledProvider, prefix: &str) -> Result<Self, InvalidBackend> {
        let values = config
            .api_keys
            .iter()
            .map(|key| {
                let mut value = HeaderValue::from_str(&format!("{prefix}{}", key.expose()))
                    .map_err(|_| InvalidBackend::HeaderValue { provider: config.name.clone(), field: "apiKey" })?;
                value.set_sensitive(true);
                Ok(value)
            })
            .collect::<Result<_, InvalidBackend>>()?;
        Ok(Credentials { values })
    }

    /// The `name: value` header for key `key`, if there are keys.
    pub fn header(&self, name: &'static str, key: usize) -> Option<(&'static str, HeaderValue)> {
        self.values.get(key).map(|value| (name, value.clone()))
    }
}
