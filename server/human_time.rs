//! Durations as the configuration writes them ("10s", "5m", "1h 30m"). Read with humantime,
//! keeping its own message when one does not parse ("unknown time unit \"x\" ..."), which
//! humantime-serde replaces with a bare "expected a duration".

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// Reads a duration written as a string.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}
