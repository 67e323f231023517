//! How the registry holds one agent: compact, with the strings a fleet
//! repeats (versions, OS, architecture, model lists) interned and shared.
//! A fleet of 100,000 nodes mostly runs a handful of versions and model
//! lists; holding them once keeps the registry's memory flat as it grows.
//! `common::Agent` is made from this only at the edge (API answers, store).
//!
//! The bottom of the router's layers: the store keeps these records, the
//! registry holds them in memory; this module uses neither.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, Utc};
use common::{Agent, AgentStatus, BackendKind, HeartbeatReport, SystemInfo};
use uuid::Uuid;

use crate::auth::TokenDigest;

/// A registration after validation: what the API layer hands the registry.
#[derive(Debug, Clone)]
pub struct Registration {
    pub machine_name: String,
    pub ip_address: IpAddr,
    pub port: u16,
    pub runtime_version: String,
    pub system_info: SystemInfo,
    pub models: Vec<String>,
    pub backend: BackendKind,
    /// Its LLM server speaks HTTPS.
    pub tls: bool,
    pub max_concurrency: Option<u32>,
}

#[cfg(test)]
impl Registration {
    /// A node on loopback with one model, for unit tests.
    pub fn for_test(name: &str, port: u16) -> Self {
        Registration {
            machine_name: name.into(),
            ip_address: std::net::IpAddr::from([127, 0, 0, 2]),
            port,
            runtime_version: "0.5.7".into(),
            system_info: common::SystemInfo {
                os: "Linux".into(),
                arch: "x86_64".into(),
                cpu_cores: 1,
                total_memory: 1,
            },
            models: vec!["m".into()],
            backend: common::BackendKind::Ollama,
            tls: false,
            max_concurrency: None,
        }
    }
}

impl TryFrom<common::RegisterRequest> for Registration {
    type Error = crate::fields::FieldError;

    /// The fields checked (`fields::check_registration`) and the address
    /// read; where a node may be is the caller's to decide
    /// (`NodeAddressPolicy`).
    fn try_from(request: common::RegisterRequest) -> Result<Self, Self::Error> {
        crate::fields::check_registration(&request)?;
        let text = request.ip_address.trim();
        let ip_address = text.parse().map_err(|_| {
            crate::fields::FieldError::new("ip_address", &format!("{text:?} is not an IP address"))
        })?;
        Ok(Registration {
            machine_name: request.machine_name.trim().to_owned(),
            ip_address,
            port: request.port,
            runtime_version: request.runtime_version,
            system_info: request.system_info,
            models: request.models,
            backend: request.backend,
            tls: request.tls,
            max_concurrency: request.max_concurrency,
        })
    }
}

/// A shared, immutable list of model names.
pub type ModelList = Arc<[Arc<str>]>;

/// What the registry knows of one node: the facts that are stored, and
/// the latest heartbeat's report, which is not.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub id: Uuid,
    pub machine_name: Box<str>,
    pub ip_address: IpAddr,
    pub port: u16,
    pub runtime_version: Arc<str>,
    pub status: AgentStatus,
    pub registered_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub os: Arc<str>,
    pub arch: Arc<str>,
    pub cpu_cores: u32,
    pub total_memory: u64,
    pub models: ModelList,
    pub backend: BackendKind,
    /// Its LLM server speaks HTTPS.
    pub tls: bool,
    /// Requests its LLM server takes at once, as registered.
    pub max_concurrency: Option<u32>,
    pub report: Report,
    /// SHA-256 of the agent's secret (stored; never shown by the API).
    pub secret_digest: Option<TokenDigest>,
}

/// The latest heartbeat's report, merged field by field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub models: Option<ModelList>,
    pub loaded_models: Option<ModelList>,
    pub requests_in_flight: Option<u32>,
    pub llm_server_up: Option<bool>,
    pub cpu_usage_percent: Option<f32>,
    pub memory_used: Option<u64>,
    pub max_concurrency: Option<u32>,
}

/// A heartbeat's report as its body has it: [`HeartbeatReport`]'s fields,
/// with the model names borrowed from the body instead of copied into
/// strings. Every agent sends its lists with every heartbeat and they
/// rarely change, so they are compared in place and copied only when they
/// do (when [`Report::merge`] interns them). A test holds the two types'
/// fields in step.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ReportUpdate<'a> {
    #[serde(default, borrow)]
    pub models: Option<Vec<ModelName<'a>>>,
    #[serde(default, borrow)]
    pub loaded_models: Option<Vec<ModelName<'a>>>,
    #[serde(default)]
    pub requests_in_flight: Option<u32>,
    #[serde(default)]
    pub llm_server_up: Option<bool>,
    #[serde(default)]
    pub cpu_usage_percent: Option<f32>,
    #[serde(default)]
    pub memory_used: Option<u64>,
    #[serde(default)]
    pub max_concurrency: Option<u32>,
}

/// A model name read from a body: borrowed, unless the JSON text escaped
/// a character and the name had to be unescaped into a copy.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelName<'a>(pub Cow<'a, str>);

impl AsRef<str> for ModelName<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for ModelName<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ModelName<'de>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a model name (a string)")
            }

            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(ModelName(Cow::Borrowed(text)))
            }

            fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
                Ok(ModelName(Cow::Owned(text.to_owned())))
            }

            fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
                Ok(ModelName(Cow::Owned(text)))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl NodeFacts {
    /// A node registering for the first time.
    pub fn registered(id: Uuid, registration: &Registration, now: DateTime<Utc>) -> Self {
        let mut facts = NodeFacts {
            id,
            machine_name: registration.machine_name.as_str().into(),
            ip_address: registration.ip_address,
            port: registration.port,
            runtime_version: intern(""),
            status: AgentStatus::Online,
            registered_at: now,
            last_seen: now,
            os: intern(""),
            arch: intern(""),
            cpu_cores: 0,
            total_memory: 0,
            models: intern_models::<&str>(&[]),
            backend: registration.backend,
            tls: registration.tls,
            max_concurrency: registration.max_concurrency,
            report: Report::default(),
            secret_digest: None,
        };
        facts.refresh(registration, now);
        facts
    }

    /// A registration of a known node (a restart): everything but its
    /// identity and registration time is taken anew, and it is Online.
    pub fn refresh(&mut self, registration: &Registration, now: DateTime<Utc>) {
        self.ip_address = registration.ip_address;
        self.runtime_version = intern(&registration.runtime_version);
        self.os = intern(&registration.system_info.os);
        self.arch = intern(&registration.system_info.arch);
        self.cpu_cores = registration.system_info.cpu_cores;
        self.total_memory = registration.system_info.total_memory;
        self.models = intern_models(&registration.models);
        self.backend = registration.backend;
        self.tls = registration.tls;
        self.max_concurrency = registration.max_concurrency;
        self.status = AgentStatus::Online;
        self.last_seen = now;
    }

    /// The form API answers show: the report included, never the secret.
    /// Strings are copied with `String::from`: `to_string` on an `Arc<str>`
    /// or a `Box<str>` goes through `Display` and the formatter's padding,
    /// which was a fifth of what listing 100,000 agents cost.
    pub fn to_wire(&self) -> Agent {
        Agent {
            id: self.id,
            machine_name: String::from(&*self.machine_name),
            ip_address: address_text(self.ip_address),
            port: self.port,
            runtime_version: String::from(&*self.runtime_version),
            status: self.status,
            registered_at: self.registered_at,
            last_seen: self.last_seen,
            system_info: SystemInfo {
                os: String::from(&*self.os),
                arch: String::from(&*self.arch),
                cpu_cores: self.cpu_cores,
                total_memory: self.total_memory,
            },
            models: to_strings(&self.models),
            backend: self.backend,
            tls: self.tls,
            max_concurrency: self.max_concurrency,
            report: self.report.to_wire(),
        }
    }

    /// `(machine_name, port)`: who it is across restarts, as the registry's
    /// identity map keys it.
    pub fn identity(&self) -> (String, u16) {
        (String::from(&*self.machine_name), self.port)
    }

    /// Requests routing may have in flight to it at once (0: no limit):
    /// the latest report's, else the registered one.
    pub fn capacity(&self) -> u64 {
        u64::from(
            self.report
                .max_concurrency
                .or(self.max_concurrency)
                .unwrap_or(0),
        )
    }

    /// The models routing should use: the latest report's, else the registered ones.
    pub fn serving_models(&self) -> &ModelList {
        self.report.models.as_ref().unwrap_or(&self.models)
    }
}

impl Report {
    fn to_wire(&self) -> HeartbeatReport {
        HeartbeatReport {
            models: self.models.as_deref().map(to_strings),
            loaded_models: self.loaded_models.as_deref().map(to_strings),
            requests_in_flight: self.requests_in_flight,
            llm_server_up: self.llm_server_up,
            cpu_usage_percent: self.cpu_usage_percent,
            memory_used: self.memory_used,
            max_concurrency: self.max_concurrency,
        }
    }

    /// Folds a heartbeat's report in; absent fields keep their last value.
    /// Returns whether anything routing looks at changed.
    pub fn merge(&mut self, report: ReportUpdate<'_>) -> bool {
        let mut routing_changed = merge_models(&mut self.models, report.models);
        routing_changed |= merge_models(&mut self.loaded_models, report.loaded_models);
        if report.llm_server_up.is_some() && report.llm_server_up != self.llm_server_up {
            self.llm_server_up = report.llm_server_up;
            routing_changed = true;
        }
        if report.requests_in_flight.is_some() {
            self.requests_in_flight = report.requests_in_flight;
        }
        if report.cpu_usage_percent.is_some() {
            self.cpu_usage_percent = report.cpu_usage_percent;
        }
        if report.memory_used.is_some() {
            self.memory_used = report.memory_used;
        }
        if report.max_concurrency.is_some() && report.max_concurrency != self.max_concurrency {
            self.max_concurrency = report.max_concurrency;
            routing_changed = true;
        }
        routing_changed
    }
}

/// Takes a reported list when there is one and it differs; says whether it did.
fn merge_models(current: &mut Option<ModelList>, reported: Option<Vec<ModelName<'_>>>) -> bool {
    let Some(reported) = reported else {
        return false;
    };
    let same = current.as_ref().is_some_and(|list| {
        list.len() == reported.len() && list.iter().zip(&reported).all(|(a, b)| **a == *b.0)
    });
    if !same {
        *current = Some(intern_models(&reported));
    }
    !same
}

/// An address as `Display` writes it. IPv4, every node's address in
/// practice, is written with `itoa`; IPv6 goes through `Display`.
fn address_text(address: IpAddr) -> String {
    match address {
        IpAddr::V4(address) => {
            let mut text = String::with_capacity(15);
            let mut digits = itoa::Buffer::new();
            for (position, octet) in address.octets().into_iter().enumerate() {
                if position > 0 {
                    text.push('.');
                }
                text.push_str(digits.format(octet));
            }
            text
        }
        IpAddr::V6(_) => address.to_string(),
    }
}

pub fn to_strings(list: &[Arc<str>]) -> Vec<String> {
    list.iter().map(|name| String::from(&**name)).collect()
}

/// Interned values. Held here for as long as some agent uses them; `prune`
/// lets go of the rest. Hashed with foldhash (seeded per process), as the
/// balancer's model map is: each registration, and each heartbeat whose
/// lists changed, hashes every name it interns, and SipHash showed in a
/// heartbeat's profile.
#[derive(Default)]
struct Interner {
    strings: Mutex<foldhash::HashSet<Arc<str>>>,
    lists: Mutex<foldhash::HashSet<ModelList>>,
}

fn interner() -> &'static Interner {
    static INTERNER: OnceLock<Interner> = OnceLock::new();
    INTERNER.get_or_init(Interner::default)
}

pub fn intern(text: &str) -> Arc<str> {
    let mut strings = interner()
        .strings
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    if let Some(existing) = strings.get(text) {
        return Arc::clone(existing);
    }
    let value: Arc<str> = Arc::from(text);
    strings.insert(Arc::clone(&value));
    value
}

pub fn intern_models<Name: AsRef<str>>(models: &[Name]) -> ModelList {
    let list: ModelList = models.iter().map(|m| intern(m.as_ref())).collect();
    let mut lists = interner()
        .lists
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    if let Some(existing) = lists.get(&list) {
        return Arc::clone(existing);
    }
    lists.insert(Arc::clone(&list));
    list
}

/// The values a load interned last, tried before the interner: a fleet's
/// agents mostly share their version, OS, architecture and model list, and
/// each trip to the interner takes its lock and hashes the text (the model
/// list, a temporary list too), 1,250 instructions an agent of a start-up.
/// Held only while one file is read, so that pruning still sees every value
/// no agent uses.
#[derive(Default)]
pub struct RecentlyInterned {
    strings: Vec<Arc<str>>,
    models: Option<ModelList>,
}

impl RecentlyInterned {
    /// Distinct strings remembered: a fleet's versions, OSes and
    /// architectures are few, and a miss costs one comparison per entry.
    const STRINGS: usize = 8;

    pub fn string(&mut self, text: &str) -> Arc<str> {
        if let Some(known) = self.strings.iter().find(|known| ***known == *text) {
            return Arc::clone(known);
        }
        let value = intern(text);
        if self.strings.len() < Self::STRINGS {
            self.strings.push(Arc::clone(&value));
        }
        value
    }

    pub fn models<Name: AsRef<str>>(&mut self, models: &[Name]) -> ModelList {
        if let Some(known) = &self.models {
            if known.len() == models.len()
                && known.iter().zip(models).all(|(a, b)| **a == *b.as_ref())
            {
                return Arc::clone(known);
            }
        }
        let list = intern_models(models);
        self.models = Some(Arc::clone(&list));
        list
    }
}

/// Drops interned values no agent uses any more (held only by the interner).
pub fn prune_interned() {
    let interner = interner();
    interner
        .lists
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .retain(|list| Arc::strong_count(list) > 1);
    interner
        .strings
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .retain(|text| Arc::strong_count(text) > 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a load's cache hands out is the interner's own value, and a
    /// list or string that differs in anything is looked up afresh.
    #[test]
    fn recently_interned_values_are_the_interned_ones() {
        let mut recent = RecentlyInterned::default();
        let version = recent.string("0.5.7-recent");
        assert!(Arc::ptr_eq(&version, &recent.string("0.5.7-recent")));
        assert!(Arc::ptr_eq(&version, &intern("0.5.7-recent")));
        for n in 0..20 {
            let text = format!("os-recent-{n}");
            let value = recent.string(&text);
            assert_eq!(&*value, text);
            assert!(Arc::ptr_eq(&value, &intern(&text)));
        }
        let two = recent.models(&["recent-a", "recent-b"]);
        assert!(Arc::ptr_eq(&two, &recent.models(&["recent-a", "recent-b"])));
        assert!(Arc::ptr_eq(&two, &intern_models(&["recent-a", "recent-b"])));
        let shorter = recent.models(&["recent-a"]);
        assert_eq!(&*shorter, &[Arc::<str>::from("recent-a")]);
        let other = recent.models(&["recent-a", "recent-c"]);
        assert_eq!(&*other[1], "recent-c");
        assert!(!Arc::ptr_eq(&two, &other));
    }

    /// Listings show an address exactly as `Display` writes it, IPv4 at the
    /// edges of every octet and IPv6 alike.
    #[test]
    fn an_address_is_written_as_display_writes_it() {
        let addresses = [
            "0.0.0.0",
            "127.0.0.1",
            "127.9.10.99",
            "127.100.200.255",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "0:0:0:0:0:0:7f00:1",
        ];
        for address in addresses {
            let address: IpAddr = address.parse().expect("an address");
            assert_eq!(address_text(address), address.to_string());
        }
    }

    #[test]
    fn repeated_values_are_shared() {
        let a = intern_models(&["llama3:8b".to_owned(), "qwen2:7b".to_owned()]);
        let b = intern_models(&["llama3:8b".to_owned(), "qwen2:7b".to_owned()]);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&intern("Linux"), &intern("Linux")));
    }

    /// The wire form of an update, field for field: written without `..`,
    /// so a field added to `HeartbeatReport` and not to `ReportUpdate`
    /// does not compile.
    fn wire(update: &ReportUpdate<'_>) -> HeartbeatReport {
        let names =
            |list: &Vec<ModelName<'_>>| list.iter().map(|name| name.0.to_string()).collect();
        HeartbeatReport {
            models: update.models.as_ref().map(names),
            loaded_models: update.loaded_models.as_ref().map(names),
            requests_in_flight: update.requests_in_flight,
            llm_server_up: update.llm_server_up,
            cpu_usage_percent: update.cpu_usage_percent,
            memory_used: update.memory_used,
            max_concurrency: update.max_concurrency,
        }
    }

    #[test]
    fn a_heartbeat_body_reads_as_the_wire_report_does() {
        let report = HeartbeatReport {
            models: Some(vec!["llama3.1:8b".into(), "qwen2.5:7b".into()]),
            loaded_models: Some(vec!["llama3.1:8b".into()]),
            requests_in_flight: Some(3),
            llm_server_up: Some(false),
            cpu_usage_percent: Some(37.5),
            memory_used: Some(1 << 36),
            max_concurrency: Some(8),
        };
        let body = serde_json::to_vec(&report).expect("serializes");
        let update: ReportUpdate = serde_json::from_slice(&body).expect("parses");
        assert_eq!(wire(&update), report);
        let models = update.models.as_deref().unwrap_or_default();
        assert!(
            models.iter().all(|name| matches!(name.0, Cow::Borrowed(_))),
            "plain names are not copied: {models:?}"
        );

        // Escapes are read (into a copy), unknown fields ignored, an
        // empty object changes nothing: as `HeartbeatReport` reads them.
        for text in [
            r#"{"models":["ll\u0061ma3","a\"b"],"future_field":1}"#,
            "{}",
            r#"{"loaded_models":[]}"#,
        ] {
            let update: ReportUpdate = serde_json::from_str(text).expect(text);
            let report: HeartbeatReport = serde_json::from_str(text).expect(text);
            assert_eq!(wire(&update), report, "{text}");
        }
        let update: ReportUpdate =
            serde_json::from_str(r#"{"models":["ll\u0061ma3"]}"#).expect("parses");
        assert_eq!(
            update.models,
            Some(vec![ModelName(Cow::Owned("llama3".into()))])
        );

        let error = serde_json::from_str::<ReportUpdate>(r#"{"models":[7]}"#)
            .expect_err("a number is not a model name");
        assert!(error.to_string().contains("a model name"), "{error}");
        assert!(serde_json::from_str::<ReportUpdate>(r#"{"models":"llama3"}"#).is_err());
    }

    #[test]
    fn the_api_form_shows_every_field_and_the_report() {
        let registration = Registration {
            machine_name: "gpu-1".into(),
            ip_address: IpAddr::from([127, 0, 0, 2]),
            port: 11434,
            runtime_version: "0.5.7".into(),
            system_info: SystemInfo {
                os: "Linux".into(),
                arch: "x86_64".into(),
                cpu_cores: 8,
                total_memory: 1 << 34,
            },
            models: vec!["a".into(), "b".into()],
            backend: BackendKind::Ollama,
            tls: true,
            max_concurrency: Some(4),
        };
        let now = Utc::now();
        let id = Uuid::new_v4();
        let mut facts = NodeFacts::registered(id, &registration, now);
        let report = HeartbeatReport {
            models: Some(vec!["a".into()]),
            loaded_models: Some(vec![]),
            requests_in_flight: Some(2),
            llm_server_up: Some(true),
            cpu_usage_percent: Some(1.5),
            memory_used: Some(7),
            max_concurrency: Some(2),
        };
        let body = serde_json::to_vec(&report).expect("serializes");
        facts
            .report
            .merge(serde_json::from_slice(&body).expect("parses"));
        assert_eq!(facts.capacity(), 2, "the report's capacity wins");
        let agent = facts.to_wire();
        assert_eq!(
            agent,
            Agent {
                id,
                machine_name: "gpu-1".into(),
                ip_address: "127.0.0.2".into(),
                port: 11434,
                runtime_version: "0.5.7".into(),
                status: AgentStatus::Online,
                registered_at: now,
                last_seen: now,
                system_info: registration.system_info.clone(),
                models: vec!["a".into(), "b".into()],
                backend: BackendKind::Ollama,
                tls: true,
                max_concurrency: Some(4),
                report,
            }
        );
    }
}
