//! Checks shared by the relay's and the consumer's settings.

use std::time::Duration;

use crate::Error;

/// The longest duration a setting may have (ten years): every deadline
/// computed from one stays far from overflowing.
pub(crate) const MAX_SETTING: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Checks that `value` is at most [`MAX_SETTING`].
pub(crate) fn bounded(setting: &'static str, value: Duration) -> Result<(), Error> {
    if value > MAX_SETTING {
        return Err(Error::InvalidConfig {
            setting,
            reason: format!("{value:?} is longer than ten years; use a shorter duration"),
        });
    }
    Ok(())
}
