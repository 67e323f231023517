//! What the registry accepts in an agent's text fields, as plain checks
//! that name the field and the problem. The API layer turns a
//! [`FieldError`] into its `422`.

use common::{RegisterRequest, SystemInfo, MAX_MACHINE_NAME_BYTES};

/// Limits on free-text fields, so one agent cannot bloat the registry.
pub const MAX_TEXT_BYTES: usize = 256;
pub const MAX_MODEL_NAME_BYTES: usize = 256;
pub const MAX_MODELS: usize = 256;

/// A field that does not hold what it must.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: &str, problem: &str) -> Self {
        FieldError {
            field: field.to_owned(),
            problem: problem.to_owned(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}: {}", self.field, self.problem)
    }
}

/// The checks of a registration's fields, in the order they are reported.
pub fn check_registration(request: &RegisterRequest) -> Result<(), FieldError> {
    let machine_name = request.machine_name.trim();
    if machine_name.is_empty() {
        return Err(FieldError::new("machine_name", "must not be empty"));
    }
    if machine_name.len() > MAX_MACHINE_NAME_BYTES {
        return Err(FieldError::new(
            "machine_name",
            &format!("must be at most {MAX_MACHINE_NAME_BYTES} bytes"),
        ));
    }
    check_text("machine_name", machine_name)?;
    check_host_name(machine_name)?;
    if request.port == 0 {
        return Err(FieldError::new("port", "must be between 1 and 65535"));
    }
    check_text("runtime_version", &request.runtime_version)?;
    check_system_info(&request.system_info)?;
    check_models("models", &request.models)
}

pub fn check_system_info(system_info: &SystemInfo) -> Result<(), FieldError> {
    check_text("system_info.os", &system_info.os)?;
    check_text("system_info.arch", &system_info.arch)
}

pub fn check_text(field: &str, value: &str) -> Result<(), FieldError> {
    if value.len() > MAX_TEXT_BYTES && field != "machine_name" {
        return Err(FieldError::new(
            field,
            &format!("must be at most {MAX_TEXT_BYTES} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    if let Some(hidden) = value.chars().find(|&c| is_invisible_or_reordering(c)) {
        return Err(FieldError::new(
            field,
            &format!(
                "must not contain invisible or text-reordering characters (found U+{:04X})",
                u32::from(hidden)
            ),
        ));
    }
    Ok(())
}

/// Characters that change how text around them reads without showing:
/// bidirectional overrides and isolates, zero-width characters, line and
/// paragraph separators. In a name they can make a log line or a CLI table
/// say something else than what the node sent.
fn is_invisible_or_reordering(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}'   // zero-width space, joiners, LRM, RLM
        | '\u{2028}'..='\u{202E}' // line/paragraph separators, bidi embeddings and overrides
        | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
        | '\u{2066}'..='\u{2069}' // bidi isolates
        | '\u{061C}'              // Arabic letter mark
        | '\u{FEFF}'              // zero-width no-break space
    )
}

/// A machine name is a host name: letters, digits, `-`, `_` and `.`, so
/// that it reads the same in a log, a table and a file name.
pub fn check_host_name(name: &str) -> Result<(), FieldError> {
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        None => Ok(()),
        Some(other) => Err(FieldError::new(
            "machine_name",
            &format!(
                "{other:?} is not allowed: a machine name is a host name (letters, digits, '-', '_' and '.'); the agent uses the host name unless --machine-name says otherwise"
            ),
        )),
    }
}

pub fn check_models<Name: AsRef<str>>(field: &str, models: &[Name]) -> Result<(), FieldError> {
    if models.len() > MAX_MODELS {
        return Err(FieldError::new(
            field,
            &format!("at most {MAX_MODELS} models"),
        ));
    }
    for model in models.iter().map(AsRef::as_ref) {
        if model.trim().is_empty()
            || model.len() > MAX_MODEL_NAME_BYTES
            || model.chars().any(char::is_control)
        {
            return Err(FieldError::new(
                field,
                &format!(
                    "each model name must be 1 to {MAX_MODEL_NAME_BYTES} bytes of printable text"
                ),
            ));
        }
    }
    Ok(())
}
