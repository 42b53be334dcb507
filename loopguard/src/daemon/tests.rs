//! The reconcile loop driven by fake layers, a fake directory and scripted
//! triggers, without root: each test breaks something the daemon must
//! notice, and asserts what it then enforces and says in its metrics.

use std::{
    cell::RefCell,
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    rc::Rc,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use super::{Enforced, Metrics, Reconciler, Sources, Stop, Trigger};
use crate::{
    compile::Plan,
    engine::{Context, Count, Damage, Engine, InForce, Layer, LayerKind, LayerSet, Options},
    nft::PacketCounts,
    paths::InstancePaths,
    policy::{CgroupPath, Directory, IdRef},
    scope::LocalTable,
    state::State,
};

/// What a fake layer says when it cannot be asked.
const UNKNOWN: &str = "unknown";

/// The plan id each fake layer enforces (`None`: nothing of it).
type World = Rc<RefCell<HashMap<LayerKind, Option<String>>>>;

struct FakeLayer {
    kind: LayerKind,
    world: World,
    staged: Option<String>,
    before: Option<Option<String>>,
}

impl FakeLayer {
    fn get(&self) -> Option<String> {
        self.world.borrow().get(&self.kind).cloned().flatten()
    }
    fn set(&self, plan: Option<String>) {
        self.world.borrow_mut().insert(self.kind, plan);
    }
}

impl Layer for FakeLayer {
    fn kind(&self) -> LayerKind {
        self.kind
    }
    fn available(&self, _: &Context<'_>) -> anyhow::Result<()> {
        Ok(())
    }
    fn stage(&mut self, _: &Context<'_>, plan: &Plan) -> anyhow::Result<()> {
        self.staged = Some(plan.id.clone());
        Ok(())
    }
    fn commit(&mut self, _: &Context<'_>, _: &Plan) -> anyhow::Result<()> {
        self.before = Some(self.get());
        let staged = self.staged.take();
        self.set(staged);
        Ok(())
    }
    fn abandon(&mut self, _: &Context<'_>) {
        self.staged = None;
    }
    fn roll_back(&mut self, _: &Context<'_>) -> anyhow::Result<()> {
        if let Some(before) = self.before.take() {
            self.set(before);
        }
        Ok(())
    }
    fn record(&self, _: &mut State) {}
    fn remove(&mut self, _: &InstancePaths) -> anyhow::Result<bool> {
        let had = self.get().is_some();
        self.set(None);
        Ok(had)
    }
    fn in_force(&self, _: &InstancePaths) -> InForce {
        match self.get() {
            // The layer's tool fails: nothing is known.
            Some(id) if id == UNKNOWN => InForce::Unknown,
            Some(id) => InForce::Plan(Some(id)),
            None => InForce::Absent,
        }
    }
    fn attest(&self, _: &InstancePaths, _: &State) -> Vec<Damage> {
        Vec::new()
    }
    fn still_there(&self, _: &InstancePaths, _: &Path) -> Option<bool> {
        // The eBPF layer's links are a stat each; the nftables layer only
        // tells by a read-back (its events are a trigger of their own).
        (self.kind == LayerKind::Bpf).then(|| self.get().is_some())
    }
    fn counts(&self, _: &InstancePaths, _: &Plan, _: &PacketCounts) -> Option<Vec<Count>> {
        None
    }
    fn sync_local(&mut self, _: &InstancePaths, _: &LocalTable) -> anyhow::Result<Option<usize>> {
        Ok(None)
    }
}

/// Users by name; a test deletes one to make it vanish.
#[derive(Clone, Default)]
struct FakeDirectory(Rc<RefCell<HashMap<String, u32>>>);

impl Directory for FakeDirectory {
    fn uid_of(&self, name: &str) -> Option<u32> {
        self.0.borrow().get(name).copied()
    }
    fn user_name(&self, uid: u32) -> Option<String> {
        self.0
            .borrow()
            .iter()
            .find(|(_, u)| **u == uid)
            .map(|(n, _)| n.clone())
    }
    fn group_members(&self, _: &IdRef) -> Option<Vec<u32>> {
        None
    }
    fn cgroup_id(&self, _: &CgroupPath) -> Option<u64> {
        None
    }
}

struct Rig {
    dir: PathBuf,
    paths: InstancePaths,
    world: World,
    users: FakeDirectory,
    metrics: Arc<Metrics>,
    published: tokio::sync::watch::Receiver<Arc<Enforced>>,
    daemon: Reconciler,
}

fn engine(paths: &InstancePaths, world: &World) -> Engine {
    let world = world.clone();
    Engine::with_layers(
        paths.clone(),
        move || {
            [LayerKind::Nft, LayerKind::Bpf]
                .into_iter()
                .map(|kind| {
                    Box::new(FakeLayer {
                        kind,
                        world: world.clone(),
                        staged: None,
                        before: None,
                    }) as Box<dyn Layer>
                })
                .collect()
        },
        // The attach point is the directory asked for, as it is.
        |requested| Ok(requested.map(Path::to_path_buf).unwrap_or_default()),
    )
}

fn policy(list: &str) -> String {
    format!("version = 1\ndefault = \"allow\"\n\n[[service]]\nname = \"db\"\nport = 5432\n{list}\n")
}

/// A daemon started on `text`, with users alice (1001) and bob (1002).
fn rig(text: &str) -> Rig {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "loopguard-daemon-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("cgroup")).expect("temp dir");
    fs::write(dir.join("policy.toml"), text).expect("policy");
    fs::write(dir.join("passwd"), "alice bob\n").expect("passwd");
    let paths = InstancePaths::with_roots(
        "test",
        &dir.join("bpffs"),
        &dir.join("run"),
        &dir.join("lib"),
    );
    let world: World = Rc::default();
    let users = FakeDirectory::default();
    users.0.borrow_mut().insert("alice".into(), 1001);
    users.0.borrow_mut().insert("bob".into(), 1002);
    let metrics = Arc::new(Metrics::new());
    let (tx, published) = tokio::sync::watch::channel(Arc::new(Enforced::default()));
    let mut daemon = Reconciler::new(
        engine(&paths, &world),
        Box::new(users.clone()),
        Options {
            cgroup: Some(dir.join("cgroup")),
            layers: LayerSet::Both,
            force: true,
        },
        Sources {
            policy: dir.join("policy.toml"),
            accounts: vec![dir.join("passwd")],
        },
        metrics.clone(),
        tx,
    );
    assert!(daemon.start(), "the daemon did not start on {text}");
    Rig {
        dir,
        paths,
        world,
        users,
        metrics,
        published,
        daemon,
    }
}

impl Rig {
    /// What each layer enforces, `(nft, bpf)`.
    fn enforced(&self) -> (Option<String>, Option<String>) {
        let w = self.world.borrow();
        let get = |k| w.get(&k).cloned().flatten();
        (get(LayerKind::Nft), get(LayerKind::Bpf))
    }
    fn plan(&self) -> Arc<Plan> {
        self.published
            .borrow()
            .plan
            .clone()
            .expect("a plan is published")
    }
    fn both(&self, id: &str) -> (Option<String>, Option<String>) {
        (Some(id.to_string()), Some(id.to_string()))
    }
    fn uids(&self) -> Vec<u32> {
        let plan = self.plan();
        crate::plan_diff::uids(&plan, &plan.services[0]).to_vec()
    }
    fn edit(&self, text: &str) {
        fs::write(self.dir.join("policy.toml"), text).expect("edit");
    }
    /// `loopguard apply` of the file from a shell, attached to `cgroup`
    /// (a directory of the rig's).
    fn apply_as_another_process(&self, cgroup: &str) {
        let prepared = crate::engine::prepare_lenient_with(
            &self.dir.join("policy.toml"),
            true,
            Default::default(),
            &self.users,
        )
        .expect("read")
        .expect("valid");
        let opts = Options {
            cgroup: Some(self.dir.join(cgroup)),
            layers: LayerSet::Both,
            force: true,
        };
        engine(&self.paths, &self.world)
            .apply(&opts, prepared)
            .expect("apply");
    }
    fn lose(&self, kind: LayerKind) {
        self.world.borrow_mut().insert(kind, None);
    }
    /// A metric's value, by its series as encoded.
    fn metric(&self, series: &str) -> Option<f64> {
        self.metrics.encode().lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn start_enforces_the_file_on_every_layer_and_publishes_it() {
    let r = rig(&policy("allow_users = [\"alice\"]"));
    let id = r.plan().id.clone();
    assert_eq!(r.enforced(), r.both(&id));
    assert_eq!(r.uids(), vec![1001]);
    assert_eq!(r.metric("loopguard_policy_file_matches_applied"), Some(1.0));
    assert_eq!(
        r.metric("loopguard_layer_enforcing{layer=\"bpf\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn an_edit_of_the_file_is_applied() {
    let mut r = rig(&policy("allow_users = [\"alice\"]"));
    let before = r.plan().id.clone();
    r.edit(&policy("allow_users = [\"alice\", \"bob\"]"));
    assert_eq!(r.daemon.step(Trigger::PolicyFile), None);
    let after = r.plan().id.clone();
    assert_ne!(before, after);
    assert_eq!(r.enforced(), r.both(&after));
    assert_eq!(r.uids(), vec![1001, 1002]);
    assert_eq!(r.metric("loopguard_policy_generation"), Some(2.0));
}

#[tokio::test]
async fn a_report_without_a_change_applies_nothing() {
    let mut r = rig(&policy("allow_users = [\"alice\"]"));
    r.daemon.step(Trigger::PolicyFile);
    r.daemon.step(Trigger::Accounts);
    assert_eq!(r.metric("loopguard_policy_generation"), Some(1.0));
}

#[tokio::test]
async fn a_broken_edit_leaves_the_policy_in_force_and_says_so() {
    let mut r = rig(&policy("allow_users = [\"alice\"]"));
    let id = r.plan().id.clone();
    r.edit("version = 1\n[[service]\nname = \"db\"\n");
    r.daemon.step(Trigger::PolicyFile);
    assert_eq!(r.enforced(), r.both(&id));
    assert_eq!(r.plan().id, id);
    assert_eq!(
        r.metric("loopguard_policy_reload_failures_total"),
        Some(1.0)
    );
    assert_eq!(r.metric("loopguard_policy_file_matches_applied"), Some(0.0));
}

#[tokio::test]
async fn a_name_that_vanishes_from_a_deny_list_stays_denied() {
    let mut r = rig(&policy("deny_users = [\"bob\"]"));
    let id = r.plan().id.clone();
    r.users.0.borrow_mut().remove("bob");
    fs::write(r.dir.join("passwd"), "alice\n").expect("passwd");
    r.daemon.step(Trigger::Accounts);
    // userdel kills nothing: bob's processes may run on, still denied.
    assert_eq!(r.uids(), vec![1002]);
    assert_eq!(r.enforced(), r.both(&id));
    assert_eq!(r.metric("loopguard_names_unresolved"), Some(1.0));
}

#[tokio::test]
async fn a_name_that_vanishes_from_an_allow_list_admits_nobody() {
    let mut r = rig(&policy("allow_users = [\"alice\", \"bob\"]"));
    r.users.0.borrow_mut().remove("bob");
    fs::write(r.dir.join("passwd"), "alice\n").expect("passwd");
    r.daemon.step(Trigger::Accounts);
    // In bob's place, a uid no process runs as.
    assert_eq!(r.uids(), vec![1001, crate::policy::VANISHED_UID]);
    let id = r.plan().id.clone();
    assert_eq!(r.enforced(), r.both(&id));
    assert_eq!(r.metric("loopguard_names_unresolved"), Some(1.0));
    // It comes back: the retry finds it, and the metric says so.
    r.users.0.borrow_mut().insert("bob".into(), 1002);
    tokio::time::pause();
    tokio::time::advance(super::RETRY_NAMES).await;
    r.daemon.step(Trigger::Tick);
    assert_eq!(r.uids(), vec![1001, 1002]);
    assert_eq!(r.metric("loopguard_names_unresolved"), Some(0.0));
}

#[tokio::test]
async fn a_lost_layer_is_noticed_and_put_back() {
    let mut r = rig(&policy("allow_users = [\"alice\"]"));
    let id = r.plan().id.clone();
    r.lose(LayerKind::Bpf);
    r.daemon.step(Trigger::Tick);
    assert_eq!(r.enforced(), r.both(&id));
    assert_eq!(
        r.metric("loopguard_layer_repairs_total{layer=\"bpf\"}"),
        Some(1.0)
    );
    // The nftables layer tells by its events.
    r.lose(LayerKind::Nft);
    r.daemon.step(Trigger::LayerEvent);
    assert_eq!(r.enforced(), r.both(&id));
    assert_eq!(
        r.metric("loopguard_layer_repairs_total{layer=\"nft\"}"),
        Some(1.0)
    );
    // The repair's own commit sends nftables events: the look reads back.
    r.daemon.step(Trigger::LayerEvent);
    assert_eq!(
        r.metric("loopguard_layer_enforcing{layer=\"nft\"}"),
        Some(1.0)
    );
}

#[tokio::test(start_paused = true)]
async fn repairs_that_do_not_hold_back_off_and_never_give_up() {
    let mut r = rig(&policy("allow_users = [\"alice\"]"));
    let id = r.plan().id.clone();
    // Something undoes every repair: the first three are made at once.
    for n in 1..=3 {
        r.lose(LayerKind::Bpf);
        r.daemon.step(Trigger::Tick);
        assert_eq!(r.enforced().1, Some(id.clone()), "repair {n}");
    }
    r.lose(LayerKind::Bpf);
    r.daemon.step(Trigger::Tick);
    assert_eq!(r.enforced().1, None, "the fourth waits for the backoff");
    assert_eq!(
        r.metric("loopguard_layer_enforcing{layer=\"bpf\"}"),
        Some(0.0)
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    r.daemon.step(Trigger::Tick);
    assert_eq!(r.enforced().1, Some(id.clone()), "then it is made");
    // The waits grow, up to a minute, and a look that finds nothing wrong
    // starts over.
    r.lose(LayerKind::Bpf);
    tokio::time::advance(Duration::from_millis(1500)).await;
    r.daemon.step(Trigger::Tick);
    assert_eq!(r.enforced().1, None, "2 s after the fourth");
    tokio::time::advance(Duration::from_millis(600)).await;
    r.daemon.step(Trigger::Tick);
    assert_eq!(r.enforced().1, Some(id.clone()));
    tokio::time::advance(Duration::from_secs(4)).await;
    r.daemon.step(Trigger::LayerEvent);
    r.lose(LayerKind::Bpf);
    r.daemon.step(Trigger::Tick);
    assert_eq!(r.enforced().1, Some(id), "a held look resets the backoff");
    assert_eq!(
        r.metric("loopguard_layer_repairs_total{layer=\"bpf\"}"),
        Some(6.0)
    );
}

#[tokio::test]
async fn remove_force_under_the_daemon_stops_it() {
    let mut r = rig(&policy("allow_users = [\"alice\"]"));
    engine(&r.paths, &r.world).remove().expect("remove");
    fs::write(&r.paths.removed_by_file, "uid 0 (pid 1)").expect("note");
    match r.daemon.step(Trigger::Tick) {
        Some(Stop::Removed(why)) => assert!(why.contains("by uid 0 (pid 1)"), "{why}"),
        other => panic!("the daemon should stop, not {other:?}"),
    }
    assert_eq!(r.enforced(), (None, None), "and not put it back");
}

#[tokio::test]
async fn a_state_taken_by_anything_else_is_put_back() {
    let mut r = rig(&policy("allow_users = [\"alice\"]"));
    let id = r.plan().id.clone();
    engine(&r.paths, &r.world).remove().expect("remove");
    // No note: not `remove --force`, which asks the daemon to stop.
    assert_eq!(r.daemon.step(Trigger::Tick), None);
    assert_eq!(r.enforced(), r.both(&id));
}

#[tokio::test]
async fn another_process_apply_is_followed() {
    let mut r = rig(&policy("allow_users = [\"alice\"]"));
    r.edit(&policy("allow_users = [\"bob\"]"));
    r.apply_as_another_process("cgroup");
    // Whatever woke the loop, the state is followed first.
    r.daemon.step(Trigger::Cgroups);
    assert_eq!(r.uids(), vec![1002]);
}

#[tokio::test]
async fn remove_force_stops_the_daemon_even_when_a_layer_cannot_be_asked() {
    let mut r = rig(&policy("allow_users = [\"alice\"]"));
    engine(&r.paths, &r.world).remove().expect("remove");
    fs::write(&r.paths.removed_by_file, "uid 0").expect("note");
    // `nft` fails now: nothing known of that layer is no sign of a policy.
    r.world
        .borrow_mut()
        .insert(LayerKind::Nft, Some(UNKNOWN.into()));
    assert!(matches!(
        r.daemon.step(Trigger::Tick),
        Some(Stop::Removed(_))
    ));
    assert_eq!(r.enforced().1, None);
}

#[tokio::test]
async fn another_process_apply_of_the_same_plan_elsewhere_is_followed() {
    let mut r = rig(&policy("allow_users = [\"alice\"]"));
    let id = r.plan().id.clone();
    fs::create_dir_all(r.dir.join("cgroup2")).expect("cgroup");
    r.apply_as_another_process("cgroup2");
    r.daemon.step(Trigger::Tick);
    assert_eq!(r.plan().id, id, "the same plan");
    assert_eq!(r.published.borrow().cgroup, r.dir.join("cgroup2"));
    // The old cgroup goes: no false "cgroup gone", no repair.
    fs::remove_dir(r.dir.join("cgroup")).expect("rmdir");
    r.lose(LayerKind::Bpf);
    r.daemon.step(Trigger::Tick);
    assert_eq!(
        r.enforced().1,
        Some(id),
        "a lost layer on the new cgroup is put back"
    );
}
