//! What a SQL text does, read off PostgreSQL's own parse tree.
//!
//! `pg_query` embeds PostgreSQL's parser; its tree is walked whole (through
//! its serde form, so no node type is skipped), not judged by the top-level
//! statement kind: a writable CTE inside a SELECT is a write, a SELECT … INTO
//! creates a table, an EXPLAIN ANALYZE runs its statement while a plain
//! EXPLAIN does not, and a function call anywhere is seen.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde_json::{Map, Value};

use crate::doc::Kind;
use crate::functions::{self, Class};

/// What one statement of a query string does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatementEffects {
    /// The statement's own text within the query string.
    pub text: String,
    /// Kinds of action, each with the table it touches (`schema.table` as
    /// written, or `table` when unqualified), or none.
    pub kinds: BTreeSet<(Kind, Option<String>)>,
    /// Functions called anywhere in the statement (lower case, no schema).
    pub functions: BTreeSet<String>,
    /// Kinds the statement has because of the built-in functions it calls,
    /// each with what does it (`pg_terminate_backend() (server
    /// administration)`).
    pub function_kinds: BTreeMap<Kind, String>,
    /// Calls of functions that are not built-in (or are qualified with a
    /// schema other than pg_catalog), as written in lower case
    /// (`schema.name` or `name`): their volatility is the target's to say.
    pub user_functions: BTreeSet<String>,
    /// An attempt to turn read-only transactions off, as written.
    pub read_only_change: Option<String>,
    /// Tables an UPDATE or DELETE without WHERE, or a TRUNCATE, touches.
    pub without_where: BTreeSet<String>,
    /// `PREPARE name AS …`: the name.
    pub prepares: Option<String>,
    /// `EXECUTE name`: the name.
    pub executes: Option<String>,
    /// `COPY … TO` in binary format (its values cannot be masked).
    pub copy_binary_out: bool,
}

/// A query string that PostgreSQL's parser refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Every statement of `sql` with what it does. An empty string (or only
/// comments) has no statements.
pub fn classify(sql: &str) -> Result<Vec<StatementEffects>, ParseError> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::default())
        .map_err(|e| ParseError(e.to_string()))?;
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|e| ParseError(e.to_string()))?;
    let mut out = Vec::new();
    let Some(stmts) = tree.get("stmts").and_then(Value::as_array) else {
        return Ok(out);
    };
    for raw in stmts {
        let start = raw
            .get("stmt_location")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let len = raw.get("stmt_len").and_then(Value::as_u64).unwrap_or(0) as usize;
        let text = if len == 0 {
            sql.get(start..)
        } else {
            sql.get(start..start.saturating_add(len))
        }
        .unwrap_or(sql)
        .trim()
        .to_string();
        let mut w = Walker::default();
        if let Some(stmt) = raw.get("stmt") {
            w.value(stmt, Mode::new(Kind::Read));
        }
        let mut fx = w.fx;
        if fx.kinds.is_empty() {
            fx.kinds.insert((w.top.unwrap_or(Kind::Read), None));
        }
        // A CTE's name read in FROM is not a table.
        fx.kinds
            .retain(|(_, t)| t.as_ref().is_none_or(|t| !w.ctes.contains(t)));
        if fx.kinds.is_empty() {
            fx.kinds.insert((Kind::Read, None));
        }
        fx.text = text;
        out.push(fx);
    }
    Ok(out)
}

/// How nodes under the current one count.
#[derive(Clone, Copy)]
struct Mode {
    kind: Kind,
    /// Under EXPLAIN without ANALYZE: planned, not run.
    plan_only: bool,
}

impl Mode {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            plan_only: false,
        }
    }

    fn with(self, kind: Kind) -> Self {
        Self { kind, ..self }
    }
}

#[derive(Default)]
struct Walker {
    fx: StatementEffects,
    ctes: HashSet<String>,
    /// The kind of the outermost statement node.
    top: Option<Kind>,
}

impl Walker {
    fn value(&mut self, v: &Value, m: Mode) {
        match v {
            Value::Object(o) => self.object(o, m),
            Value::Array(a) => a.iter().for_each(|x| self.value(x, m)),
            _ => {}
        }
    }

    fn object(&mut self, o: &Map<String, Value>, m: Mode) {
        // A RangeVar held directly in a typed field (`relation`, `rel`).
        if o.contains_key("relname") && o.contains_key("inh") {
            self.table(o, m);
            return;
        }
        if o.len() == 1
            && let Some(Value::Object(inner)) = o.get("node")
        {
            for (ty, body) in inner {
                self.node(ty, body, m);
            }
            return;
        }
        for v in o.values() {
            self.value(v, m);
        }
    }

    fn fields_except(&mut self, body: &Value, skip: &[&str], m: Mode) {
        if let Value::Object(o) = body {
            for (k, v) in o {
                if !skip.contains(&k.as_str()) {
                    self.value(v, m);
                }
            }
        }
    }

    fn kind(&mut self, k: Kind, table: Option<String>, m: Mode) {
        let k = if m.plan_only { Kind::Read } else { k };
        self.fx.kinds.insert((k, table));
    }

    fn table(&mut self, o: &Map<String, Value>, m: Mode) {
        self.kind(m.kind, Some(table_name(o)), m);
    }

    fn unbounded(&mut self, rel: Option<&Value>, m: Mode) {
        if let (false, Some(Value::Object(o))) = (m.plan_only, rel) {
            self.fx.without_where.insert(table_name(o));
        }
    }

    fn statement(&mut self, k: Kind) {
        if self.top.is_none() {
            self.top = Some(k);
        }
    }

    /// A function call (not under a plain EXPLAIN): its name for rules that
    /// name functions, the kind its class gives, and whether the target
    /// must say what it does.
    fn call(&mut self, body: &Value) {
        let parts: Vec<String> = body
            .get("funcname")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|n| n.pointer("/node/String/sval").and_then(Value::as_str))
            .map(str::to_lowercase)
            .collect();
        let Some((name, qualifiers)) = parts.split_last() else {
            return;
        };
        self.fx.functions.insert(name.clone());
        let schema = qualifiers.last();
        let builtin = functions::builtin(name);
        if builtin.is_none() || schema.is_some_and(|s| s != "pg_catalog") {
            self.fx.user_functions.insert(parts.join("."));
        }
        let Some(Some(class)) = builtin else { return };
        let mut kind = class.kind();
        if class == Class::Config {
            let first = body.pointer("/args/0");
            let setting = first.and_then(literal_text).map(|t| t.to_lowercase());
            let value = body.pointer("/args/1");
            match setting.as_deref() {
                Some("role" | "session_authorization" | "search_path") => kind = Kind::Session,
                Some("default_transaction_read_only" | "transaction_read_only") => {
                    if !value.is_some_and(turns_on) {
                        self.read_only_changed(&format!("{name}() of read-only"));
                    }
                }
                Some(_) => {}
                // A name computed at run time could be any of them.
                None => {
                    kind = Kind::Session;
                    self.read_only_changed(&format!("{name}() of a computed setting"));
                }
            }
        }
        self.fx
            .function_kinds
            .entry(kind)
            .or_insert_with(|| format!("{name}() ({})", class.as_str()));
    }

    fn read_only_changed(&mut self, what: &str) {
        if self.fx.read_only_change.is_none() {
            self.fx.read_only_change = Some(what.to_string());
        }
    }

    /// SET/RESET of the read-only settings (anything but turning them on),
    /// and SET TRANSACTION / SESSION CHARACTERISTICS … READ WRITE.
    fn read_only_setting(&mut self, name: &str, body: &Value) {
        let lower = name.to_lowercase();
        match lower.as_str() {
            "default_transaction_read_only" | "transaction_read_only" => {
                // VAR_SET_VALUE is 1 in pg_query's enum.
                let sets_on = body.get("kind").and_then(Value::as_i64) == Some(1)
                    && body.pointer("/args/0").is_some_and(turns_on);
                if !sets_on {
                    self.read_only_changed(&format!("a change of {lower}"));
                }
            }
            "transaction" | "session characteristics" if read_write_option(body) => {
                self.read_only_changed(&format!("SET {name} READ WRITE"));
            }
            _ => {}
        }
    }

    fn node(&mut self, ty: &str, body: &Value, m: Mode) {
        let field = |k: &str| body.get(k);
        let is_null = |k: &str| field(k).is_none_or(Value::is_null);
        match ty {
            "RangeVar" => {
                if let Value::Object(o) = body {
                    self.table(o, m);
                }
            }
            "FuncCall" => {
                if !m.plan_only {
                    self.call(body);
                }
                self.value(body, m);
            }
            // ALTER TABLE … OWNER TO: a change of who may do what.
            "AlterTableCmd" if !is_null("newowner") => {
                self.kind(Kind::Privilege, None, m);
                self.value(body, m);
            }
            "CommonTableExpr" => {
                if let Some(n) = field("ctename").and_then(Value::as_str) {
                    self.ctes.insert(n.to_string());
                }
                self.value(body, m);
            }
            "SelectStmt" => {
                self.statement(Kind::Read);
                if let Some(rel) = field("into_clause").and_then(|i| i.get("rel")) {
                    self.value(rel, m.with(Kind::Ddl));
                }
                // FOR UPDATE/SHARE: the rows read are locked as well.
                if field("locking_clause")
                    .and_then(Value::as_array)
                    .is_some_and(|l| !l.is_empty())
                {
                    self.kind(Kind::Lock, None, m);
                    if let Some(from) = field("from_clause") {
                        self.value(from, m.with(Kind::Lock));
                    }
                }
                self.fields_except(body, &["into_clause"], m.with(Kind::Read));
            }
            "InsertStmt" | "MergeStmt" => {
                self.statement(Kind::Write);
                if let Some(r) = field("relation") {
                    self.value(r, m.with(Kind::Write));
                }
                self.fields_except(body, &["relation"], m.with(Kind::Read));
            }
            "UpdateStmt" | "DeleteStmt" => {
                self.statement(Kind::Write);
                if let Some(r) = field("relation") {
                    self.value(r, m.with(Kind::Write));
                }
                if is_null("where_clause") {
                    self.unbounded(field("relation"), m);
                }
                self.fields_except(body, &["relation"], m.with(Kind::Read));
            }
            "TruncateStmt" => {
                self.statement(Kind::Write);
                for r in field("relations")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    self.value(r, m.with(Kind::Write));
                    self.unbounded(r.pointer("/node/RangeVar"), m);
                }
            }
            "CopyStmt" => {
                let from = field("is_from").and_then(Value::as_bool).unwrap_or(false);
                let program = field("is_program")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let file = field("filename")
                    .and_then(Value::as_str)
                    .is_some_and(|f| !f.is_empty());
                let k = if from { Kind::Write } else { Kind::Read };
                self.statement(k);
                let binary = field("options")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o.pointer("/node/DefElem"))
                    .any(|d| {
                        d.get("defname").and_then(Value::as_str) == Some("format")
                            && d.pointer("/arg/node/String/sval")
                                .and_then(Value::as_str)
                                .is_some_and(|f| f.eq_ignore_ascii_case("binary"))
                    });
                if binary && !from && !m.plan_only {
                    self.fx.copy_binary_out = true;
                }
                if program || file {
                    self.kind(Kind::Server, None, m);
                }
                if let Some(r) = field("relation") {
                    self.value(r, m.with(k));
                }
                self.fields_except(body, &["relation"], m.with(Kind::Read));
            }
            "ExplainStmt" => {
                self.statement(Kind::Read);
                let analyze = field("options")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o.pointer("/node/DefElem"))
                    .any(|d| {
                        d.get("defname").and_then(Value::as_str) == Some("analyze")
                            && !matches!(
                                d.pointer("/arg/node/String/sval")
                                    .or_else(|| d.pointer("/arg/node/Boolean/boolval"))
                                    .map(|v| v.to_string().trim_matches('"').to_lowercase())
                                    .as_deref(),
                                Some("false" | "off" | "0")
                            )
                    });
                let inner = Mode {
                    plan_only: m.plan_only || !analyze,
                    ..m
                };
                if let Some(q) = field("query") {
                    self.value(q, inner);
                }
            }
            "PrepareStmt" => {
                self.fx.prepares = field("name").and_then(Value::as_str).map(str::to_string);
                if let Some(q) = field("query") {
                    self.value(q, m);
                }
            }
            "ExecuteStmt" => {
                self.statement(Kind::Read);
                self.fx.executes = field("name").and_then(Value::as_str).map(str::to_string);
                self.fields_except(body, &["name"], m.with(Kind::Read));
            }
            "DeclareCursorStmt" => {
                self.statement(Kind::Read);
                self.value(body, m.with(Kind::Read));
            }
            "CreateTableAsStmt" => {
                self.statement(Kind::Ddl);
                if let Some(rel) = field("into").and_then(|i| i.get("rel")) {
                    self.value(rel, m.with(Kind::Ddl));
                }
                self.fields_except(body, &["into"], m.with(Kind::Read));
            }
            "DoStmt" | "CallStmt" => {
                self.statement(Kind::Procedural);
                self.kind(Kind::Procedural, None, m);
                self.value(body, m.with(Kind::Read));
            }
            "VariableSetStmt" => {
                let name = field("name").and_then(Value::as_str).unwrap_or("");
                self.read_only_setting(name, body);
                // VAR_RESET_ALL is 6 in pg_query's enum.
                let reset_all = field("kind").and_then(Value::as_i64) == Some(6);
                let k = match name.to_lowercase().as_str() {
                    "role" | "session_authorization" | "search_path" => Kind::Session,
                    "transaction" | "transaction_isolation" | "transaction_read_only" => {
                        Kind::Transaction
                    }
                    _ if reset_all => Kind::Session,
                    _ => Kind::Config,
                };
                self.statement(k);
                self.kind(k, None, m);
            }
            "DiscardStmt" => {
                self.statement(Kind::Session);
                self.kind(Kind::Session, None, m);
            }
            "VariableShowStmt" | "FetchStmt" => {
                self.statement(Kind::Read);
                self.kind(Kind::Read, None, m);
            }
            "DeallocateStmt" | "ClosePortalStmt" => {
                self.statement(Kind::Config);
                self.kind(Kind::Config, None, m);
            }
            "TransactionStmt" | "ConstraintsSetStmt" => {
                if read_write_option(body) {
                    self.read_only_changed("a READ WRITE transaction");
                }
                self.statement(Kind::Transaction);
                self.kind(Kind::Transaction, None, m);
            }
            _ if ty.ends_with("Stmt") => {
                let k = stmt_kind(ty);
                self.statement(k);
                self.kind(k, None, m);
                self.value(body, m.with(k));
            }
            _ => self.value(body, m),
        }
    }
}

/// The text of a string constant node.
fn literal_text(v: &Value) -> Option<&str> {
    v.pointer("/node/AConst/val/Sval/sval")
        .and_then(Value::as_str)
}

/// Whether a constant node turns a boolean setting on.
fn turns_on(v: &Value) -> bool {
    if let Some(t) = literal_text(v) {
        return matches!(
            t.to_lowercase().as_str(),
            "on" | "true" | "yes" | "1" | "t" | "y"
        );
    }
    if let Some(i) = v
        .pointer("/node/AConst/val/Ival/ival")
        .and_then(Value::as_i64)
    {
        return i != 0;
    }
    v.pointer("/node/AConst/val/Boolval/boolval")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Whether transaction options (`BEGIN …`, `SET TRANSACTION …`) say READ
/// WRITE.
fn read_write_option(body: &Value) -> bool {
    ["options", "args"]
        .iter()
        .filter_map(|k| body.get(*k).and_then(Value::as_array))
        .flatten()
        .filter_map(|o| o.pointer("/node/DefElem"))
        .any(|d| {
            d.get("defname").and_then(Value::as_str) == Some("transaction_read_only")
                && d.get("arg").is_some_and(|a| !turns_on(a))
        })
}

/// A RangeVar as written: `schema.table`, or `table` when unqualified.
fn table_name(o: &Map<String, Value>) -> String {
    let name = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("");
    match (name("schemaname"), name("relname")) {
        ("", rel) => rel.to_string(),
        (schema, rel) => format!("{schema}.{rel}"),
    }
}

/// The kind of a statement node the walker has no special case for.
fn stmt_kind(ty: &str) -> Kind {
    match ty {
        "GrantStmt"
        | "GrantRoleStmt"
        | "CreateRoleStmt"
        | "AlterRoleStmt"
        | "AlterRoleSetStmt"
        | "DropRoleStmt"
        | "AlterDefaultPrivilegesStmt"
        | "ReassignOwnedStmt"
        | "DropOwnedStmt"
        | "CreatePolicyStmt"
        | "AlterPolicyStmt"
        | "AlterOwnerStmt"
        | "CreateUserMappingStmt"
        | "AlterUserMappingStmt"
        | "DropUserMappingStmt" => Kind::Privilege,
        "VacuumStmt" | "ClusterStmt" | "ReindexStmt" | "CheckPointStmt" | "ListenStmt"
        | "UnlistenStmt" | "NotifyStmt" | "LockStmt" => Kind::Utility,
        "LoadStmt" | "AlterSystemStmt" => Kind::Server,
        _ => Kind::Ddl,
    }
}
