//! The model versions a runtime serves, parsed from `--model [VERSION=]SPEC`,
//! each with its own queue; one of them is the default.
//!
//! The folder holds what serves a version: `demo` (the built-in model),
//! `exec` (models run by worker processes, with their line protocol and
//! supervisor) and `queue` (each version's run slots and waiting calls).

pub(crate) mod demo;
pub(crate) mod exec;
pub(crate) mod queue;

use std::{fmt, str::FromStr, sync::Arc};

use crate::{
    error::{Error, Result},
    model::Model,
    versions::demo::Demo,
    versions::exec::Exec,
    versions::queue::Queue,
};

/// How a version is served, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelSpec {
    /// The version name, when given (`v2=builtin:demo`).
    pub version: Option<String>,
    /// What serves it.
    pub kind: SpecKind,
}

/// The kinds of model a runtime can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SpecKind {
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
pub(crate) fn valid_version_name(name: &str) -> bool {
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
pub(crate) struct Version {
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
    pub(crate) fn functions(&self) -> Vec<String> {
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

/// A model registered by a program embedding the runtime
/// ([`crate::Runtime::model`]).
#[derive(Clone)]
pub(crate) struct Registered {
    /// Its version name.
    pub(crate) version: String,
    /// How `describe` shows it, e.g. `rust:word_count::WordCount`.
    pub(crate) spec: String,
    /// The implementation.
    pub(crate) model: Arc<dyn Model>,
}

/// All served versions.
#[derive(Debug)]
pub(crate) struct Versions {
    list: Vec<Arc<Version>>,
    default: usize,
}

impl Versions {
    /// Builds the versions: the `registered` models first, then the flags'
    /// `specs`; with neither, the built-in demo. Unnamed specs are called
    /// `v1`, `v2`… by position; `default` names the default (else the
    /// first). Registered and built-in versions run `max_running` calls at
    /// once; `exec:` versions one per worker, with the settings `exec` gives
    /// for their name. No process starts here: see [`Model::start`].
    pub(crate) fn build(
        registered: &[Registered],
        specs: &[ModelSpec],
        default: Option<&str>,
        max_running: usize,
        max_waiting: usize,
        exec: &dyn Fn(&str) -> exec::Settings,
    ) -> Result<Self> {
        let demo = [ModelSpec { version: None, kind: SpecKind::Builtin("demo".into()) }];
        let specs = if specs.is_empty() && registered.is_empty() { &demo[..] } else { specs };
        let mut list: Vec<Arc<Version>> = Vec::with_capacity(registered.len() + specs.len());
        let add = |list: &mut Vec<Arc<Version>>, version: Version| {
            if list.iter().any(|v| v.name == version.name) {
                return Err(Error::Config(format!("model version {:?} is given twice", version.name)));
            }
            list.push(Arc::new(version));
            Ok(())
        };
        for r in registered {
            if !valid_version_name(&r.version) {
                return Err(Error::Config(format!(
                    "model version name {:?}: use 1 to 63 letters, digits, '.', '_' or '-'",
                    r.version
                )));
            }
            let version = Version {
                name: r.version.clone(),
                spec: r.spec.clone(),
                model: Arc::clone(&r.model),
                queue: Queue::new(max_running, max_waiting),
            };
            add(&mut list, version)?;
        }
        for (i, spec) in specs.iter().enumerate() {
            let name = spec.version.clone().unwrap_or_else(|| format!("v{}", registered.len() + i + 1));
            let (model, running): (Arc<dyn Model>, usize) = match &spec.kind {
                SpecKind::Builtin(b) if b == "demo" => (Arc::new(Demo), max_running),
                SpecKind::Builtin(b) => {
                    return Err(Error::Config(format!(
                        "--model {spec}: unknown built-in model {b:?}; use builtin:demo or exec:COMMAND ARGS…"
                    )));
                }
                SpecKind::Exec(command) => {
                    let argv =
                        exec::split_command(command).map_err(|e| Error::Config(format!("--model {spec}: {e}")))?;
                    exec::find_program(&argv[0]).map_err(|e| Error::Config(format!("--model {spec}: {e}")))?;
                    let settings = exec(&name);
                    (Arc::new(Exec::new(&name, argv, settings)), settings.workers.max(1))
                }
            };
            let kind = ModelSpec { version: None, kind: spec.kind.clone() };
            add(&mut list, Version { spec: kind.to_string(), name, model, queue: Queue::new(running, max_waiting) })?;
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
    pub(crate) fn get(&self, name: &str) -> Result<&Arc<Version>> {
        if name.is_empty() {
            return Ok(&self.list[self.default]);
        }
        self.list
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::UnknownVersion { version: name.to_owned(), available: names(&self.list) })
    }

    /// The default version.
    pub(crate) fn default_version(&self) -> &Arc<Version> {
        &self.list[self.default]
    }

    /// Every version, in the order given.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Version>> {
        self.list.iter()
    }

    /// Whether every version's model is ready.
    pub(crate) fn all_ready(&self) -> bool {
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
        let v = Versions::build(&[], &[spec("big=exec:python3 m.py"), spec("builtin:demo")], None, 8, 4, &settings)
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
        let v =
            Versions::build(&[], &[spec("builtin:demo"), spec("canary=builtin:demo")], Some("canary"), 2, 2, &settings)
                .expect("build");
        assert_eq!(v.default_version().name, "canary");
        assert_eq!(v.get("").expect("default").name, "canary");
        assert_eq!(v.get("v1").expect("v1").functions(), crate::versions::demo::FUNCTIONS);
        assert_eq!(v.get("canary").expect("canary").spec, "builtin:demo", "the spec without the version name");
        assert!(matches!(v.get("v9"), Err(Error::UnknownVersion { .. })));
    }

    #[test]
    fn rejects_bad_sets_with_clear_errors() {
        let err = |specs: &[&str], default: Option<&str>| {
            let specs: Vec<_> = specs.iter().map(|s| spec(s)).collect();
            Versions::build(&[], &specs, default, 1, 1, &settings).expect_err("must fail").to_string()
        };
        assert!(err(&["a=builtin:demo", "a=builtin:demo"], None).contains("given twice"));
        assert!(err(&["builtin:nope"], None).contains("unknown built-in model"));
        assert!(err(&["exec:python3 'm.py"], None).contains("unbalanced quotes"));
        let missing = err(&["exec:no-such-model-program --x"], None);
        assert!(
            missing.contains("--model exec:no-such-model-program") && missing.contains("not found on PATH"),
            "{missing}"
        );
        assert!(err(&["exec:/no/such/model"], None).contains("does not exist or is not executable"));
        assert!(err(&["builtin:demo"], Some("v7")).contains("not one of the served versions"));
        let demo = Versions::build(&[], &[], None, 1, 1, &settings).expect("no model at all: the demo");
        assert_eq!(
            (demo.default_version().name.as_str(), demo.default_version().spec.as_str()),
            ("v1", "builtin:demo")
        );
    }
}

#[cfg(test)]
mod registered_tests {
    use std::time::Duration;

    use super::*;

    fn settings(_: &str) -> exec::Settings {
        exec::Settings { workers: 1, start_timeout: Duration::from_secs(1), grace: Duration::from_secs(1) }
    }

    fn registered(version: &str) -> Registered {
        Registered { version: version.into(), spec: "rust:Demo".into(), model: Arc::new(Demo) }
    }

    #[test]
    fn registered_models_come_first_and_replace_the_demo_default() {
        let v = Versions::build(&[registered("mine")], &[], None, 3, 2, &settings).expect("build");
        assert_eq!(v.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["mine"]);
        assert_eq!(v.default_version().spec, "rust:Demo");
        let with_flag =
            Versions::build(&[registered("mine")], &["builtin:demo".parse().expect("spec")], None, 3, 2, &settings)
                .expect("build");
        assert_eq!(with_flag.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["mine", "v2"]);
        let clash =
            Versions::build(&[registered("v1")], &["v1=builtin:demo".parse().expect("spec")], None, 1, 1, &settings);
        assert!(clash.expect_err("twice").to_string().contains("given twice"));
        let bad = Versions::build(&[registered("no spaces")], &[], None, 1, 1, &settings);
        assert!(bad.expect_err("bad name").to_string().contains("model version name"));
    }
}
