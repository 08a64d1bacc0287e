//! The model versions a runtime serves, parsed from `--model [VERSION=]SPEC`,
//! each with its own queue; one of them is the default.

use std::{fmt, str::FromStr, sync::Arc};

use crate::{
    demo::Demo,
    error::{Error, Result},
    exec::{self, Exec},
    model::Model,
    queue::Queue,
};

/// How a version is served, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The version name, when given (`v2=builtin:demo`).
    pub version: Option<String>,
    /// What serves it.
    pub kind: SpecKind,
}

/// The kinds of model a runtime can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecKind {
    /// A model compiled into the runtime, e.g. `builtin:demo`.
    Builtin(String),
    /// Worker processes started from a command line (`exec:python3 m.py`).
    Exec(String),
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(v) = &self.version {
            write!(f, "{v}=")?;
        }
        match &self.kind {
            SpecKind::Builtin(name) => write!(f, "builtin:{name}"),
            SpecKind::Exec(cmd) => write!(f, "exec:{cmd}"),
        }
    }
}

/// Whether `name` is a valid version name: 1–63 of `[A-Za-z0-9._-]`.
pub fn valid_version_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl FromStr for ModelSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let (version, rest) = match s.split_once('=') {
            Some((v, rest)) if valid_version_name(v) => (Some(v.to_owned()), rest),
            _ => (None, s),
        };
        let kind = if let Some(name) = rest.strip_prefix("builtin:") {
            SpecKind::Builtin(name.trim().to_owned())
        } else if let Some(cmd) = rest.strip_prefix("exec:") {
            if cmd.trim().is_empty() {
                return Err(format!("model spec {s:?}: exec: needs a command, e.g. exec:python3 model.py"));
            }
            SpecKind::Exec(cmd.trim().to_owned())
        } else {
            return Err(format!("model spec {s:?}: expected [VERSION=]builtin:NAME or [VERSION=]exec:COMMAND"));
        };
        Ok(Self { version, kind })
    }
}

/// One served version.
pub struct Version {
    /// Its name.
    pub name: String,
    /// How it is served, for `describe`.
    pub spec: String,
    /// The implementation.
    pub model: Arc<dyn Model>,
    /// Its run slots and waiting line.
    pub queue: Arc<Queue>,
}

impl Version {
    /// Its functions, sorted (empty while `exec:` workers start).
    pub fn functions(&self) -> Vec<String> {
        let mut functions = self.model.functions();
        functions.sort();
        functions
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Version").field("name", &self.name).field("spec", &self.spec).finish_non_exhaustive()
    }
}

/// All served versions.
#[derive(Debug)]
pub struct Versions {
    list: Vec<Arc<Version>>,
    default: usize,
}

impl Versions {
    /// Builds the versions from their specs. Unnamed specs are called `v1`,
    /// `v2`… by position; `default` names the default (else the first).
    /// Built-in versions run `max_running` calls at once; `exec:` versions
    /// one per worker, with the settings `exec` gives for their name. No
    /// process starts here: see [`Model::start`].
    pub fn build(
        specs: &[ModelSpec],
        default: Option<&str>,
        max_running: usize,
        max_waiting: usize,
        exec: &dyn Fn(&str) -> exec::Settings,
    ) -> Result<Self> {
        if specs.is_empty() {
            return Err(Error::Config("no model to serve: give at least one --model".into()));
        }
        let mut list: Vec<Arc<Version>> = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let name = spec.version.clone().unwrap_or_else(|| format!("v{}", i + 1));
            if list.iter().any(|v| v.name == name) {
                return Err(Error::Config(format!("model version {name:?} is given twice")));
            }
            let (model, running): (Arc<dyn Model>, usize) = match &spec.kind {
                SpecKind::Builtin(b) if b == "demo" => (Arc::new(Demo), max_running),
                SpecKind::Builtin(b) => {
                    return Err(Error::Config(format!("unknown built-in model {b:?}; built-in models: demo")));
                }
                SpecKind::Exec(command) => {
                    let argv =
                        exec::split_command(command).map_err(|e| Error::Config(format!("model spec {spec}: {e}")))?;
                    let settings = exec(&name);
                    (Arc::new(Exec::new(&name, argv, settings)), settings.workers.max(1))
                }
            };
            list.push(Arc::new(Version {
                spec: spec.to_string(),
                name,
                model,
                queue: Queue::new(running, max_waiting),
            }));
        }
        let default = match default.filter(|d| !d.is_empty()) {
            None => 0,
            Some(d) => list.iter().position(|v| v.name == d).ok_or_else(|| {
                Error::Config(format!("--default-version {d:?} is not one of the served versions: {}", names(&list)))
            })?,
        };
        Ok(Self { list, default })
    }

    /// The version called `name`; the default for an empty name.
    pub fn get(&self, name: &str) -> Result<&Arc<Version>> {
        if name.is_empty() {
            return Ok(&self.list[self.default]);
        }
        self.list
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::UnknownVersion { version: name.to_owned(), available: names(&self.list) })
    }

    /// The default version.
    pub fn default_version(&self) -> &Arc<Version> {
        &self.list[self.default]
    }

    /// Every version, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Version>> {
        self.list.iter()
    }

    /// Whether every version's model is ready.
    pub fn all_ready(&self) -> bool {
        self.list.iter().all(|v| v.model.is_ready())
    }
}

fn names(list: &[Arc<Version>]) -> String {
    list.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec(s: &str) -> ModelSpec {
        s.parse().expect("spec")
    }

    fn settings(version: &str) -> exec::Settings {
        let workers = if version == "big" { 3 } else { 1 };
        exec::Settings { workers, start_timeout: Duration::from_secs(1), grace: Duration::from_secs(1) }
    }

    #[test]
    fn exec_versions_run_one_call_per_worker_and_start_nothing_yet() {
        let v = Versions::build(&[spec("big=exec:python3 m.py"), spec("builtin:demo")], None, 8, 4, &settings)
            .expect("build");
        let big = v.get("big").expect("big");
        assert_eq!(big.queue.running_limit(), 3);
        assert_eq!(v.get("v2").expect("demo").queue.running_limit(), 8);
        assert!(big.functions().is_empty(), "functions come from the workers' ready");
        assert!(!big.model.is_ready() && !v.all_ready());
    }

    #[test]
    fn parses_specs_with_and_without_version() {
        assert_eq!(spec("builtin:demo"), ModelSpec { version: None, kind: SpecKind::Builtin("demo".into()) });
        assert_eq!(spec("v2=builtin:demo").version.as_deref(), Some("v2"));
        let e = spec("exec:python3 m.py --lr=0.1");
        assert_eq!((e.version, e.kind), (None, SpecKind::Exec("python3 m.py --lr=0.1".into())));
        assert_eq!(spec("prod=exec:./serve --a=b").version.as_deref(), Some("prod"));
        assert!("demo".parse::<ModelSpec>().is_err());
        assert!("exec:".parse::<ModelSpec>().is_err());
    }

    #[test]
    fn builds_named_versions_and_picks_the_default() {
        let v = Versions::build(&[spec("builtin:demo"), spec("canary=builtin:demo")], Some("canary"), 2, 2, &settings)
            .expect("build");
        assert_eq!(v.default_version().name, "canary");
        assert_eq!(v.get("").expect("default").name, "canary");
        assert_eq!(v.get("v1").expect("v1").functions(), crate::demo::FUNCTIONS);
        assert!(matches!(v.get("v9"), Err(Error::UnknownVersion { .. })));
    }

    #[test]
    fn rejects_bad_sets_with_clear_errors() {
        let err = |specs: &[&str], default: Option<&str>| {
            let specs: Vec<_> = specs.iter().map(|s| spec(s)).collect();
            Versions::build(&specs, default, 1, 1, &settings).expect_err("must fail").to_string()
        };
        assert!(err(&["a=builtin:demo", "a=builtin:demo"], None).contains("given twice"));
        assert!(err(&["builtin:nope"], None).contains("unknown built-in model"));
        assert!(err(&["exec:python3 'm.py"], None).contains("unbalanced quotes"));
        assert!(err(&["builtin:demo"], Some("v7")).contains("not one of the served versions"));
        assert!(Versions::build(&[], None, 1, 1, &settings).is_err());
    }
}
