//! What both binaries' command lines share: the log format and how a
//! number of seconds is read.

use std::time::Duration;

/// Log lines as text for people, or JSON for log pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Seconds as a positive number, fractions allowed ("60", "0.5").
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 1e9 {
        return Err(format!("{text:?}: seconds must be a positive number"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Seconds, where 0 means "off" (`--health-check-interval 0`).
pub fn parse_seconds_or_off(text: &str) -> Result<Duration, String> {
    if text.trim().parse::<f64>() == Ok(0.0) {
        return Ok(Duration::ZERO);
    }
    parse_seconds(text)
        .map_err(|_| format!("{text:?}: seconds must be 0 (off) or a positive number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_turns_a_periodic_thing_off() {
        assert_eq!(parse_seconds_or_off("0"), Ok(Duration::ZERO));
        assert_eq!(parse_seconds_or_off("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_seconds_or_off("-1").is_err());
    }

    #[test]
    fn seconds_are_positive_numbers() {
        assert_eq!(parse_seconds("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_seconds(" 0.5 "), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "NaN", "inf", "soon", ""] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }
}
