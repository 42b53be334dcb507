//! TOML -> [`Policy`], keeping spans, collecting every problem.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use super::toml::{Kind, Table, Value};
use ipnet::IpNet;

use super::{
    AddrSet, BindGuard, CgroupPath, IdList, IdRef, ListKind, Mode, Policy, PortRange, Protocol,
    Service, Span, Verdict, POLICY_VERSION,
};
use crate::diag::{Code, Diagnostic};

pub(super) const ROOT_KEYS: &[&str] = &["version", "default", "mode", "log_allowed", "service"];
pub(super) const SERVICE_KEYS: &[&str] = &[
    "name",
    "port",
    "protocol",
    "addresses",
    "allow_users",
    "allow_groups",
    "deny_users",
    "deny_groups",
    "allow_cgroups",
    "deny_cgroups",
    "allow_units",
    "deny_units",
    "bind_users",
    "bind_groups",
    "mode",
    "log_allowed",
];

/// Parses a policy file. Returns the policy built from everything that was
/// valid (services with errors are left out) and every problem found. The
/// policy is usable only when no diagnostic is an error.
/// Returns the text too, shared (diagnostics quote it).
pub fn parse(file: &str, source: String) -> (Arc<str>, Option<Policy>, Vec<Diagnostic>) {
    let mut p = Parser {
        diags: Vec::new(),
        lists: HashSet::default(),
        numeric: HashMap::default(),
    };
    let (source, root, errors) = super::toml::parse(source);
    let Some(root) = root else {
        return (source.clone(), None, syntax_diagnostics(&source, errors));
    };
    let policy = p.policy(file, source.clone(), &root);
    (source, policy, p.diags)
}

/// One mistake, one error: the first syntax error (the parser recovers
/// and reports what follows from it too), said where the mistake is, and
/// how many more were left unsaid. An array or inline table left open is
/// said at the end of its last line, with where it opened, rather than at
/// the next line the parser stumbled on.
fn syntax_diagnostics(source: &str, mut errors: Vec<super::toml::SyntaxError>) -> Vec<Diagnostic> {
    errors.sort_by_key(|e| e.span.start);
    let more = errors.len().saturating_sub(1);
    let Some(e) = errors.into_iter().next() else {
        return Vec::new();
    };
    let at = e.span.start.min(source.len());
    let line_start = source[..at].rfind('\n').map_or(0, |i| i + 1);
    // The parser stumbled on what starts a new statement (a table header,
    // a `key =`): the line before it left a bracket open. (An unquoted
    // value inside a closed array is another mistake: said as it is.)
    let line = source[line_start..].lines().next().unwrap_or("");
    let stumbled =
        source[line_start..at].trim().chars().all(|c| c == '[') && starts_statement(line);
    let mut d = match (open_bracket_before(source, line_start), stumbled, &e.first) {
        (Some(open), true, None) => {
            // The end of the last line with something on it before `at`.
            let end = source[..line_start].trim_end().len().max(open + 1);
            let (what, close) = if source.as_bytes().get(open) == Some(&b'{') {
                ("inline table", '}')
            } else {
                ("array", ']')
            };
            Diagnostic::error(
                Code::Syntax,
                format!("invalid TOML: this {what} is not closed: `{close}` is missing"),
            )
            .primary(
                end.saturating_sub(1)..end,
                format!("`{close}` expected after this"),
            )
            .secondary(open..open + 1, format!("the {what} opens here"))
        }
        _ => {
            let d = Diagnostic::error(Code::Syntax, format!("invalid TOML: {}", e.message))
                .primary(e.span, "here");
            match e.first {
                Some(first) => d.secondary(first, "first defined here"),
                None => d,
            }
        }
    };
    if more > 0 {
        d = d.note(format!(
            "and {more} more error{} after this one, probably caused by it: fix this one first",
            if more == 1 { "" } else { "s" }
        ));
    }
    vec![d]
}

/// Whether `line` starts a TOML statement: a table header or `key =`.
fn starts_statement(line: &str) -> bool {
    let t = line.trim_start();
    if t.starts_with('[') {
        return true;
    }
    match t.find('=') {
        Some(eq) => {
            let key = t[..eq].trim();
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c))
        }
        None => false,
    }
}

/// Where the innermost array (`[`) or inline table (`{`) still open at
/// byte `at` of `source` opens, if one is. A small scan: strings and
/// comments are skipped; a `[` is an array when it follows `=`, `,` or
/// another open bracket (else it starts a table header).
fn open_bracket_before(source: &str, at: usize) -> Option<usize> {
    let bytes = source.as_bytes();
    let mut open: Vec<usize> = Vec::new();
    let mut last = b'\n';
    let mut i = 0;
    while i < at.min(bytes.len()) {
        let c = bytes[i];
        match c {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' => {
                // A string (multi-line ones too): to its closing quote.
                let triple = bytes.get(i..i + 3) == Some(&[c, c, c][..]);
                let quote: &[u8] = if triple {
                    &bytes[i..i + 3]
                } else {
                    &bytes[i..i + 1]
                };
                i += quote.len();
                while i < bytes.len() && !bytes[i..].starts_with(quote) {
                    if c == b'"' && bytes[i] == b'\\' {
                        i += 1;
                    }
                    if !triple && bytes[i.min(bytes.len() - 1)] == b'\n' {
                        break;
                    }
                    i += 1;
                }
                i += quote.len();
                last = b'"';
                continue;
            }
            b'[' | b'{' if c == b'{' || !open.is_empty() || matches!(last, b'=' | b',') => {
                open.push(i);
            }
            b']' | b'}' => {
                open.pop();
            }
            _ => {}
        }
        if !c.is_ascii_whitespace() {
            last = c;
        }
        i += 1;
    }
    open.last().copied()
}

struct Parser {
    diags: Vec<Diagnostic>,
    /// Every distinct id list once (see [`IdList`]). foldhash: SipHash
    /// was 7% of reading a 10,000-service policy (the file is root's, so
    /// flooding is no concern; foldhash is still seeded per process).
    lists: HashSet<Arc<[IdRef]>, foldhash::fast::RandomState>,
    /// The same lists by their numbers, for lists of plain numeric ids:
    /// a repeated list is found without building its `IdRef`s.
    numeric: HashMap<Box<[u32]>, Arc<[IdRef]>, foldhash::fast::RandomState>,
}

fn span(v: &Value) -> Span {
    v.span()
}

fn type_name(v: &Value) -> &'static str {
    v.type_name()
}

impl Parser {
    fn error(&mut self, code: Code, span: Span, message: String, label: &str) {
        self.diags
            .push(Diagnostic::error(code, message).primary(span, label));
    }

    fn wrong_type(&mut self, key: &str, v: &Value, expected: &str) {
        self.error(
            Code::Type,
            span(v),
            format!("`{key}` must be {expected}, found {}", type_name(v)),
            &format!("expected {expected}"),
        );
    }

    fn unknown_keys(&mut self, table: &Table, known: &[&str], what: &str) {
        for key in table.keys() {
            if !known.contains(&&*key.name) {
                let d = Diagnostic::error(
                    Code::UnknownKey,
                    format!("unknown key `{}` in {what}", key.name),
                )
                .primary(key.pos.range(), "not a policy key")
                .note(format!("expected one of: {}", known.join(", ")));
                self.diags.push(d);
            }
        }
    }

    fn policy(&mut self, file: &str, source: Arc<str>, root: &Value) -> Option<Policy> {
        let Some(table) = root.as_table() else {
            self.wrong_type("the policy", root, "a table");
            return None;
        };
        self.unknown_keys(table, ROOT_KEYS, "the policy");

        match table.get("version") {
            None => self.diags.push(
                Diagnostic::error(Code::MissingKey, "missing `version`")
                    .primary(0..0, "the policy starts here")
                    .note(format!("add `version = {POLICY_VERSION}` at the top")),
            ),
            Some(v) => match v.as_integer() {
                Some(POLICY_VERSION) => {}
                Some(n) => self.error(
                    Code::Version,
                    span(v),
                    format!("unsupported policy version {n}"),
                    &format!("this loopguard reads version {POLICY_VERSION}"),
                ),
                None => self.wrong_type("version", v, "an integer"),
            },
        }
        let default = self
            .keyword(
                table,
                "default",
                &[("allow", Verdict::Allow), ("deny", Verdict::Deny)],
            )
            .unwrap_or(Verdict::Allow);
        let mode = self
            .keyword(
                table,
                "mode",
                &[("enforce", Mode::Enforce), ("audit", Mode::Audit)],
            )
            .unwrap_or(Mode::Enforce);
        let log_allowed = self.boolean(table, "log_allowed").unwrap_or(false);

        let mut services = Vec::new();
        if let Some(v) = table.get("service") {
            match v.as_array() {
                Some(items) => {
                    for item in items.iter() {
                        if let Some(s) = self.service(&item, mode, log_allowed) {
                            services.push(s);
                        }
                    }
                }
                None => self.wrong_type("service", v, "an array of tables (`[[service]]`)"),
            }
        }
        Some(Policy {
            file: file.to_string(),
            source,
            default,
            default_span: table.get("default").map(span),
            mode,
            mode_span: table.get("mode").map(span),
            log_allowed,
            services,
        })
    }

    fn keyword<T: Copy>(&mut self, table: &Table, key: &str, choices: &[(&str, T)]) -> Option<T> {
        let v = table.get(key)?;
        let Some(s) = v.as_str() else {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            self.wrong_type(key, v, &format!("one of {}", names.join(", ")));
            return None;
        };
        match choices.iter().find(|(n, _)| *n == s) {
            Some((_, t)) => Some(*t),
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                self.error(
                    Code::Value,
                    span(v),
                    format!("`{key}` must be one of {}, found \"{s}\"", names.join(", ")),
                    "unknown value",
                );
                None
            }
        }
    }

    fn boolean(&mut self, table: &Table, key: &str) -> Option<bool> {
        let v = table.get(key)?;
        match v.as_bool() {
            Some(b) => Some(b),
            None => {
                self.wrong_type(key, v, "true or false");
                None
            }
        }
    }

    fn service(&mut self, item: &Value, global_mode: Mode, global_log: bool) -> Option<Service> {
        let Some(table) = item.as_table() else {
            self.wrong_type("service", item, "a table");
            return None;
        };
        let errors_before = self.diags.len();
        self.unknown_keys(table, SERVICE_KEYS, "a service");

        let name = match table.get("name") {
            None => {
                let at = table
                    .keys()
                    .map(|k| k.pos.range())
                    .min_by_key(|s| s.start)
                    .unwrap_or_else(|| span(item));
                self.error(
                    Code::MissingKey,
                    at,
                    "service without a `name`".into(),
                    "in this service",
                );
                None
            }
            Some(v) => match v.as_str() {
                None => {
                    self.wrong_type("name", v, "a string");
                    None
                }
                Some(n) if !valid_name(n) => {
                    self.diags.push(
                        Diagnostic::error(Code::Name, format!("invalid service name \"{n}\""))
                            .primary(span(v), "not a valid name")
                            .note("names match [a-z0-9][a-z0-9_-]{0,31}"),
                    );
                    None
                }
                Some("default") => {
                    self.diags.push(
                        Diagnostic::error(Code::Name, "the service name \"default\" is reserved")
                            .primary(span(v), "reserved")
                            .note("metrics and status name the policy's default `default`; choose another name"),
                    );
                    None
                }
                Some(n) => Some((n.to_string(), span(v))),
            },
        };
        let here = name
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| span(item));

        let ports = match table.get("port") {
            None => {
                self.error(
                    Code::MissingKey,
                    here.clone(),
                    "service without a `port`".into(),
                    "this service",
                );
                None
            }
            Some(v) => self.ports(v),
        };
        let protocol = self
            .keyword(
                table,
                "protocol",
                &[
                    ("tcp", Protocol::Tcp),
                    ("udp", Protocol::Udp),
                    ("any", Protocol::Any),
                ],
            )
            .unwrap_or(Protocol::Tcp);
        let addresses = match table.get("addresses") {
            None => Some(AddrSet::Loopback),
            Some(v) => self.addresses(v),
        };

        let lists: Vec<(&str, Option<&Value>)> = [
            "allow_users",
            "allow_groups",
            "allow_cgroups",
            "allow_units",
            "deny_users",
            "deny_groups",
            "deny_cgroups",
            "deny_units",
        ]
        .iter()
        .map(|k| (*k, table.get(k)))
        .collect();
        let has_allow = lists[..4].iter().any(|(_, v)| v.is_some());
        let has_deny = lists[4..].iter().any(|(_, v)| v.is_some());
        let list = match (has_allow, has_deny) {
            (true, false) => Some(ListKind::Allow),
            (false, true) => Some(ListKind::Deny),
            (false, false) => {
                self.diags.push(
                    Diagnostic::error(Code::NoList, "service has neither an allow-list nor a deny-list")
                        .primary(here.clone(), "this service")
                        .note("add `allow_users`/`allow_groups`/`allow_cgroups`/`allow_units` (only they may connect) or `deny_users`/`deny_groups`/`deny_cgroups`/`deny_units` (they may not)"),
                );
                None
            }
            (true, true) => {
                let mut d = Diagnostic::error(
                    Code::BothLists,
                    "service has both an allow-list and a deny-list",
                )
                .primary(here.clone(), "this service")
                .note(
                    "a service is either an allow-list or a deny-list; split it into two services",
                );
                for (k, v) in &lists {
                    if let Some(v) = v {
                        d = d.secondary(span(v), format!("`{k}`"));
                    }
                }
                self.diags.push(d);
                None
            }
        };
        let (users_key, groups_key, cgroups_key, units_key) = match list {
            Some(ListKind::Deny) => (lists[4].1, lists[5].1, lists[6].1, lists[7].1),
            _ => (lists[0].1, lists[1].1, lists[2].1, lists[3].1),
        };
        let users = users_key.map(|v| self.ids(v, "user")).unwrap_or_default();
        let groups = groups_key.map(|v| self.ids(v, "group")).unwrap_or_default();
        let cgroups = cgroups_key.map(|v| self.cgroups(v)).unwrap_or_default();
        let units = units_key.map(|v| self.units(v)).unwrap_or_default();
        let (bind_users, bind_groups) = (table.get("bind_users"), table.get("bind_groups"));
        let bind = (bind_users.is_some() || bind_groups.is_some()).then(|| BindGuard {
            users: bind_users.map(|v| self.ids(v, "user")).unwrap_or_default(),
            groups: bind_groups
                .map(|v| self.ids(v, "group"))
                .unwrap_or_default(),
        });

        let mode = self
            .keyword(
                table,
                "mode",
                &[("enforce", Mode::Enforce), ("audit", Mode::Audit)],
            )
            .unwrap_or(global_mode);
        let log_allowed = self.boolean(table, "log_allowed").unwrap_or(global_log);

        if self.diags[errors_before..].iter().any(Diagnostic::is_error) {
            return None;
        }
        let (name, name_span) = name?;
        Some(Service {
            name,
            name_span,
            ports: ports?,
            protocol,
            addresses: addresses?,
            list: list?,
            users,
            users_span: users_key.map(span),
            groups,
            cgroups,
            units,
            bind,
            mode,
            mode_span: table.get("mode").map(span),
            log_allowed,
        })
    }

    fn ports(&mut self, v: &Value) -> Option<PortRange> {
        let one = |n: i64| u16::try_from(n).ok().filter(|p| *p != 0);
        match &v.kind {
            Kind::Integer(n) => match one(*n) {
                Some(p) => Some(PortRange { first: p, last: p }),
                None => {
                    self.error(
                        Code::Port,
                        span(v),
                        format!("port {n} is out of range"),
                        "ports are 1-65535",
                    );
                    None
                }
            },
            Kind::String(s) => {
                let parsed = match s.split_once('-') {
                    None => s.trim().parse::<i64>().ok().map(|a| (a, a)),
                    Some((a, b)) => a
                        .trim()
                        .parse::<i64>()
                        .ok()
                        .zip(b.trim().parse::<i64>().ok()),
                };
                match parsed {
                    None => {
                        self.error(
                            Code::Port,
                            span(v),
                            format!("invalid port range \"{s}\""),
                            "expected \"PORT\" or \"FIRST-LAST\"",
                        );
                        None
                    }
                    Some((a, b)) => match (one(a), one(b)) {
                        (Some(first), Some(last)) if first <= last => {
                            Some(PortRange { first, last })
                        }
                        (Some(_), Some(_)) => {
                            self.error(
                                Code::Port,
                                span(v),
                                format!("port range \"{s}\" is reversed"),
                                &format!("did you mean \"{b}-{a}\"?"),
                            );
                            None
                        }
                        _ => {
                            self.error(
                                Code::Port,
                                span(v),
                                format!("port range \"{s}\" is out of range"),
                                "ports are 1-65535",
                            );
                            None
                        }
                    },
                }
            }
            _ => {
                self.wrong_type(
                    "port",
                    v,
                    "a port number or a range string like \"8000-8099\"",
                );
                None
            }
        }
    }

    fn addresses(&mut self, v: &Value) -> Option<AddrSet> {
        let Some(items) = v.as_array() else {
            self.wrong_type("addresses", v, "an array of strings");
            return None;
        };
        if items.is_empty() {
            self.error(
                Code::Addresses,
                span(v),
                "`addresses` is empty".into(),
                "list addresses, or leave the key out for every loopback route",
            );
            return None;
        }
        let mut ok = true;
        let mut loopback: Option<Span> = None;
        let mut nets = Vec::new();
        for item in items.iter() {
            let item = &*item;
            let Some(s) = item.as_str() else {
                self.wrong_type("an address", item, "a string");
                ok = false;
                continue;
            };
            if s == "loopback" {
                loopback = Some(span(item));
                continue;
            }
            match parse_net(s) {
                Err(msg) => {
                    self.error(
                        Code::Address,
                        span(item),
                        format!("invalid address \"{s}\""),
                        &msg,
                    );
                    ok = false;
                }
                Ok(net) => nets.push((net, span(item))),
            }
        }
        if let (Some(l), false) = (&loopback, nets.is_empty()) {
            let mut d = Diagnostic::error(
                Code::Addresses,
                "`loopback` already covers every other address listed",
            )
            .primary(l.clone(), "every route to this host");
            for (_, s) in &nets {
                d = d.secondary(s.clone(), "covered by `loopback`");
            }
            self.diags.push(d);
            return None;
        }
        if !ok {
            return None;
        }
        if loopback.is_some() {
            return Some(AddrSet::Loopback);
        }
        let nets: Vec<IpNet> = nets.into_iter().map(|(n, _)| n).collect();
        Some(AddrSet::Nets(IpNet::aggregate(&nets)))
    }

    /// `allow_cgroups`/`deny_cgroups`: cgroup v2 paths.
    fn cgroups(&mut self, v: &Value) -> Vec<(CgroupPath, Span)> {
        self.strings(v, "cgroup path", Code::Cgroup, CgroupPath::new)
    }

    /// `allow_units`/`deny_units`: systemd unit names.
    fn units(&mut self, v: &Value) -> Vec<(String, Span)> {
        self.strings(v, "systemd unit name", Code::Unit, |s| {
            super::valid_unit_name(s)
                .then(|| s.to_string())
                .ok_or("a unit with a cgroup: its name ends in .service, .scope, .slice, .socket, .mount or .swap")
        })
    }

    /// An array of strings, each read by `read` (which says what is wrong
    /// with one it refuses), with their spans.
    fn strings<T>(
        &mut self,
        v: &Value,
        what: &str,
        code: Code,
        read: impl Fn(&str) -> Result<T, &'static str>,
    ) -> Vec<(T, Span)> {
        let Some(items) = v.as_array() else {
            self.wrong_type(&format!("{what}s"), v, &format!("an array of {what}s"));
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items.iter() {
            let item = &*item;
            match &item.kind {
                Kind::String(s) => match read(s) {
                    Ok(value) => out.push((value, span(item))),
                    Err(why) => self.error(
                        code,
                        span(item),
                        format!("\"{s}\" is not a valid {what}"),
                        why,
                    ),
                },
                _ => self.wrong_type(&format!("a {what}"), item, &format!("a {what} string")),
            }
        }
        out
    }

    fn ids(&mut self, v: &Value, what: &str) -> IdList {
        let Some(items) = v.as_array() else {
            self.wrong_type(&format!("{what}s"), v, "an array of names and numeric ids");
            return IdList::default();
        };
        if let Some(ids) = items.plain_uints() {
            // (uid_t)-1 is refused below, with its span.
            if !ids.contains(&u32::MAX) {
                let ids = match self.numeric.get(ids) {
                    Some(shared) => shared.clone(),
                    None => {
                        let refs: Vec<IdRef> = ids.iter().map(|&id| IdRef::Id(id)).collect();
                        let shared = self.intern(refs);
                        self.numeric.insert(ids.into(), shared.clone());
                        shared
                    }
                };
                // Group ids may not exist: they keep their spans.
                let name_spans = if what == "group" {
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, v)| (i, span(&v)))
                        .collect()
                } else {
                    Vec::new()
                };
                return IdList { ids, name_spans };
            }
        }
        let mut out = Vec::with_capacity(items.len());
        let mut name_spans = Vec::new();
        for item in items.iter() {
            let item = &*item;
            let id = match &item.kind {
                Kind::Integer(n) => match u32::try_from(*n) {
                    // (uid_t)-1 means "no id" to the kernel.
                    Ok(id) if id != u32::MAX => Some(IdRef::Id(id)),
                    _ => {
                        self.error(
                            Code::Id,
                            span(item),
                            format!("{n} is not a valid id"),
                            "ids are 0-4294967294",
                        );
                        None
                    }
                },
                Kind::String(s) => {
                    if let Ok(id) = s.parse::<u32>() {
                        Some(IdRef::Id(id))
                    } else if valid_account_name(s) {
                        Some(IdRef::Name(s.to_string()))
                    } else {
                        self.error(
                            Code::Id,
                            span(item),
                            format!("\"{s}\" is not a valid {what} name"),
                            "invalid name",
                        );
                        None
                    }
                }
                _ => {
                    self.wrong_type(&format!("a {what}"), item, "a name or a numeric id");
                    None
                }
            };
            if let Some(value) = id {
                // A user id always resolves; names and groups may not.
                if what == "group" || matches!(value, IdRef::Name(_)) {
                    name_spans.push((out.len(), span(item)));
                }
                out.push(value);
            }
        }
        IdList {
            ids: self.intern(out),
            name_spans,
        }
    }

    /// The shared copy of an id list.
    fn intern(&mut self, ids: Vec<IdRef>) -> Arc<[IdRef]> {
        match self.lists.get(&ids[..]) {
            Some(shared) => shared.clone(),
            None => {
                let ids: Arc<[IdRef]> = ids.into();
                self.lists.insert(ids.clone());
                ids
            }
        }
    }
}

/// `[a-z0-9][a-z0-9_-]{0,31}`
pub fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Names as useradd/groupadd and NSS accept them, loosely.
pub fn valid_account_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 256
        && !n.starts_with('-')
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b'$' | b'@'))
}

/// An address or prefix inside the loopback scope; IPv4-mapped prefixes
/// become IPv4.
fn parse_net(s: &str) -> Result<IpNet, String> {
    let net = if s.contains('/') {
        let net: IpNet = s
            .parse()
            .map_err(|_| "expected an IP address or a CIDR prefix".to_string())?;
        if net.trunc() != net {
            return Err(format!("host bits are set; did you mean {}?", net.trunc()));
        }
        net
    } else {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| "expected an IP address or a CIDR prefix".to_string())?;
        IpNet::from(ip)
    };
    let net = match net {
        IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
            Some(v4) if v6.prefix_len() >= 96 => {
                IpNet::V4(ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_err(|e| e.to_string())?)
            }
            _ => IpNet::V6(v6),
        },
        v4 => v4,
    };
    let loop4: IpNet = IpNet::V4(
        ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(127, 0, 0, 0), 8).map_err(|e| e.to_string())?,
    );
    let in_scope = match net {
        IpNet::V4(_) => loop4.contains(&net),
        IpNet::V6(v6) => v6.prefix_len() == 128 && v6.addr() == std::net::Ipv6Addr::LOCALHOST,
    };
    if !in_scope {
        return Err("outside the loopback scope (127.0.0.0/8, ::1); use \"loopback\" for every route to this host".into());
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("postgres"));
        assert!(valid_name("0-a_b"));
        assert!(!valid_name("-a"));
        assert!(!valid_name("Postgres"));
        assert!(!valid_name(&"a".repeat(33)));
    }

    #[test]
    fn nets() {
        assert_eq!(parse_net("127.0.0.2").unwrap().to_string(), "127.0.0.2/32");
        assert_eq!(
            parse_net("::ffff:127.0.1.0/120").unwrap().to_string(),
            "127.0.1.0/24"
        );
        assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
        assert!(parse_net("10.0.0.1").is_err());
        assert!(parse_net("127.0.0.5/24")
            .unwrap_err()
            .contains("127.0.0.0/24"));
        assert!(parse_net("::2").is_err());
    }
}
