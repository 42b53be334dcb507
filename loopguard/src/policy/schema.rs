//! The policy file's JSON Schema, generated from the reader's own key
//! lists ([`super::parse`]'s `ROOT_KEYS` and `SERVICE_KEYS`), so the two
//! cannot drift: a key the reader accepts and the schema lacks fails a
//! test. Editors (taplo / Even Better TOML) validate policy files with it
//! as you type; `docs/policy.schema.json` is this, committed.
//!
//! The schema checks structure (keys, types, value sets, one list per
//! service); what needs the whole file or the host (overlaps, names that
//! resolve) stays with `loopguard check`.

use serde_json::{json, Value};

use super::parse::{ROOT_KEYS, SERVICE_KEYS};

const ACCOUNT_LIST: &str = "account_list";

/// The schema of one root key.
fn root_key(key: &str) -> Option<Value> {
    Some(match key {
        "version" => json!({"const": 1, "description": "The policy format version: 1."}),
        "default" => json!({
            "enum": ["allow", "deny"],
            "description": "What happens to loopback traffic no service matches (default: allow)."
        }),
        "mode" => json!({
            "enum": ["enforce", "audit"],
            "description": "enforce refuses; audit only logs would-deny (default: enforce)."
        }),
        "log_allowed" => json!({"type": "boolean", "description": "Also log allowed attempts."}),
        "service" => json!({
            "type": "array",
            "items": {"$ref": "#/definitions/service"},
            "description": "The guarded services ([[service]] tables)."
        }),
        _ => return None,
    })
}

/// The schema of one service key.
fn service_key(key: &str) -> Option<Value> {
    let accounts =
        |what: &str| json!({"$ref": format!("#/definitions/{ACCOUNT_LIST}"), "description": what});
    let cgroups = |what: &str| {
        json!({
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "description": format!("{what} Paths relative to the cgroup2 root, e.g. \"system.slice/grafana.service\".")
        })
    };
    Some(match key {
        "name" => json!({
            "type": "string",
            "pattern": "^[a-z0-9][a-z0-9_-]{0,31}$",
            "not": {"const": "default"},
            "description": "Unique; names events, metrics and status rows."
        }),
        "port" => json!({
            "oneOf": [
                {"type": "integer", "minimum": 1, "maximum": 65535},
                {"type": "string", "pattern": "^[0-9]{1,5}(-[0-9]{1,5})?$"}
            ],
            "description": "A port, or an inclusive range like \"8000-8099\"."
        }),
        "protocol" => json!({"enum": ["tcp", "udp", "any"], "description": "Default: tcp."}),
        "addresses" => json!({
            "type": "array",
            "items": {"type": "string"},
            "description": "Loopback prefixes (127.0.0.0/8, ::1); default: every route to this host."
        }),
        "allow_users" => accounts("Only these users may reach the service."),
        "allow_groups" => accounts("Only members of these groups may reach the service."),
        "deny_users" => accounts("These users may not reach the service."),
        "deny_groups" => accounts("Members of these groups may not reach the service."),
        "allow_cgroups" => cgroups("Processes in these cgroups (or below) may reach the service."),
        "deny_cgroups" => {
            cgroups("Processes in these cgroups (or below) may not reach the service.")
        }
        "allow_units" => json!({
            "type": "array",
            "items": {"type": "string", "pattern": "^[A-Za-z0-9:_.\\\\@-]+\\.(service|scope|slice|socket|mount|swap)$"},
            "description": "Processes of these systemd units (their cgroups) may reach the service."
        }),
        "deny_units" => json!({
            "type": "array",
            "items": {"type": "string", "pattern": "^[A-Za-z0-9:_.\\\\@-]+\\.(service|scope|slice|socket|mount|swap)$"},
            "description": "Processes of these systemd units (their cgroups) may not reach the service."
        }),
        "bind_users" => accounts("Only these users may listen on the service's ports."),
        "bind_groups" => {
            accounts("Only members of these groups may listen on the service's ports.")
        }
        "mode" => json!({"enum": ["enforce", "audit"], "description": "This service's mode."}),
        "log_allowed" => json!({"type": "boolean"}),
        _ => return None,
    })
}

/// The whole schema (JSON Schema draft-07).
pub fn policy_schema() -> Value {
    let props = |keys: &[&str], of: fn(&str) -> Option<Value>| -> serde_json::Map<String, Value> {
        keys.iter()
            .map(|k| ((*k).to_string(), of(k).unwrap_or_else(|| json!({}))))
            .collect()
    };
    let allow = json!({"anyOf": [{"required": ["allow_users"]}, {"required": ["allow_groups"]}, {"required": ["allow_cgroups"]}, {"required": ["allow_units"]}]});
    let deny = json!({"anyOf": [{"required": ["deny_users"]}, {"required": ["deny_groups"]}, {"required": ["deny_cgroups"]}, {"required": ["deny_units"]}]});
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": "https://loopguard.dev/policy.schema.json",
        "title": "loopguard policy",
        "description": "Which local users may reach (and listen on) which loopback services. See docs/policy.md.",
        "type": "object",
        "required": ["version"],
        "additionalProperties": false,
        "properties": props(ROOT_KEYS, root_key),
        "definitions": {
            ACCOUNT_LIST: {
                "type": "array",
                "items": {"oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "integer", "minimum": 0, "maximum": 4294967294u32}
                ]}
            },
            "service": {
                "type": "object",
                "required": ["name", "port"],
                "additionalProperties": false,
                "properties": props(SERVICE_KEYS, service_key),
                // Exactly one of an allow-list and a deny-list.
                "oneOf": [
                    {"allOf": [allow.clone(), {"not": deny.clone()}]},
                    {"allOf": [deny, {"not": allow}]}
                ]
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_the_reader_takes_is_described() {
        for k in ROOT_KEYS {
            assert!(root_key(k).is_some(), "root key {k} has no schema");
        }
        for k in SERVICE_KEYS {
            assert!(service_key(k).is_some(), "service key {k} has no schema");
        }
    }

    /// `docs/policy.schema.json` is the generated schema, committed.
    #[test]
    fn the_committed_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/policy.schema.json");
        let want = serde_json::to_string_pretty(&policy_schema()).expect("json") + "\n";
        let have = std::fs::read_to_string(path).unwrap_or_default();
        if have != want {
            if std::env::var_os("LOOPGUARD_BLESS").is_some() {
                std::fs::write(path, &want).expect("write the schema");
            } else {
                panic!("{path} is stale: run `LOOPGUARD_BLESS=1 cargo test -p loopguard schema`");
            }
        }
    }
}
