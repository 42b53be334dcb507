//! The engine's orchestration, driven by fake layers: every failure path
//! leaves the previous policy in force, without root.

use std::{cell::RefCell, path::Path, rc::Rc};

use super::*;
use crate::scope::LocalTable;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    Available,
    Stage,
    Commit,
    RollBack,
}

/// What each fake layer "enforces": the plan id in force, per kind.
type World = Rc<RefCell<Vec<(LayerKind, Option<String>)>>>;

struct Fake {
    kind: LayerKind,
    fail: Option<Step>,
    world: World,
    log: Rc<RefCell<Vec<String>>>,
    staged: Option<String>,
    before: Option<Option<String>>,
}

impl Fake {
    fn in_force(&self) -> Option<String> {
        self.world
            .borrow()
            .iter()
            .find(|(k, _)| *k == self.kind)
            .and_then(|(_, p)| p.clone())
    }
    fn set(&self, plan: Option<String>) {
        let mut w = self.world.borrow_mut();
        w.retain(|(k, _)| *k != self.kind);
        w.push((self.kind, plan));
    }
    fn step(&self, step: Step) -> anyhow::Result<()> {
        self.log
            .borrow_mut()
            .push(format!("{:?} {}", step, self.kind));
        if self.fail == Some(step) {
            anyhow::bail!("{} {:?} fails", self.kind, step);
        }
        Ok(())
    }
}

impl Layer for Fake {
    fn kind(&self) -> LayerKind {
        self.kind
    }
    fn available(&self, _: &Context<'_>) -> anyhow::Result<()> {
        self.step(Step::Available)
    }
    fn judges_cgroups(&self) -> bool {
        self.kind == LayerKind::Bpf
    }
    fn stage(&mut self, _: &Context<'_>, plan: &Plan) -> anyhow::Result<()> {
        self.step(Step::Stage)?;
        self.staged = Some(plan.id.clone());
        Ok(())
    }
    fn commit(&mut self, _: &Context<'_>, _: &Plan) -> anyhow::Result<()> {
        self.step(Step::Commit)?;
        self.before = Some(self.in_force());
        let staged = self.staged.take();
        self.set(staged);
        Ok(())
    }
    fn abandon(&mut self, _: &Context<'_>) {
        self.log.borrow_mut().push(format!("Abandon {}", self.kind));
        self.staged = None;
    }
    fn roll_back(&mut self, _: &Context<'_>) -> anyhow::Result<()> {
        self.step(Step::RollBack)?;
        if let Some(before) = self.before.take() {
            self.set(before);
        }
        Ok(())
    }
    fn record(&self, _: &mut State) {}
    fn remove(&mut self, _: &InstancePaths) -> anyhow::Result<bool> {
        self.log.borrow_mut().push(format!("Remove {}", self.kind));
        let had = self.in_force().is_some();
        self.set(None);
        Ok(had)
    }
    fn in_force(&self, _: &InstancePaths) -> InForce {
        InForce::Plan(Fake::in_force(self))
    }
    fn attest(&self, _: &InstancePaths, _: &State) -> Vec<Damage> {
        Vec::new()
    }
    fn still_there(&self, _: &InstancePaths, _: &Path) -> Option<bool> {
        None
    }
    fn counts(
        &self,
        _: &InstancePaths,
        _: &Plan,
        _: &crate::nft::PacketCounts,
    ) -> Option<Vec<Count>> {
        None
    }
    fn sync_local(&mut self, _: &InstancePaths, _: &LocalTable) -> anyhow::Result<Option<usize>> {
        Ok(None)
    }
}

struct Rig {
    world: World,
    log: Rc<RefCell<Vec<String>>>,
    layers: Vec<Box<dyn Layer>>,
}

/// nft then bpf, as [`layers`] orders them, both enforcing plan "old".
fn rig(fail: &[(LayerKind, Step)]) -> Rig {
    let world: World = Rc::new(RefCell::new(vec![
        (LayerKind::Nft, Some("old".into())),
        (LayerKind::Bpf, Some("old".into())),
    ]));
    let log = Rc::new(RefCell::new(Vec::new()));
    let layers = [LayerKind::Nft, LayerKind::Bpf]
        .into_iter()
        .map(|kind| {
            Box::new(Fake {
                kind,
                fail: fail.iter().find(|(k, _)| *k == kind).map(|(_, s)| *s),
                world: world.clone(),
                log: log.clone(),
                staged: None,
                before: None,
            }) as Box<dyn Layer>
        })
        .collect();
    Rig { world, log, layers }
}

fn plan(id: &str) -> Plan {
    Plan {
        id: id.into(),
        ..compile::tests_support::empty_plan()
    }
}

fn run(rig: &mut Rig, want: LayerSet) -> Result<Vec<LayerKind>, EnforceError> {
    run_plan(rig, want, &plan("new"))
}

fn run_plan(rig: &mut Rig, want: LayerSet, plan: &Plan) -> Result<Vec<LayerKind>, EnforceError> {
    let paths = InstancePaths::with_roots(
        "fake",
        Path::new("/nonexistent"),
        Path::new("/nonexistent"),
        Path::new("/nonexistent"),
    );
    let ctx = Context {
        paths: &paths,
        cgroup: Path::new("/nonexistent"),
        previous: None,
        trusted: true,
        netns_cookie: 0,
        cgroups_unjudgeable: None,
    };
    enforce(&mut rig.layers, want, &ctx, plan)
}

fn enforced(rig: &Rig) -> Vec<(LayerKind, Option<String>)> {
    let mut w = rig.world.borrow().clone();
    w.sort();
    w
}

fn both(plan: &str) -> Vec<(LayerKind, Option<String>)> {
    vec![
        (LayerKind::Bpf, Some(plan.into())),
        (LayerKind::Nft, Some(plan.into())),
    ]
}

#[test]
fn both_layers_commit_in_order() {
    let mut r = rig(&[]);
    assert_eq!(
        run(&mut r, LayerSet::Both).expect("ok"),
        [LayerKind::Bpf, LayerKind::Nft]
    );
    assert_eq!(enforced(&r), both("new"));
    assert_eq!(
        *r.log.borrow(),
        [
            "Available nft",
            "Available bpf",
            "Stage nft",
            "Stage bpf",
            "Commit nft",
            "Commit bpf"
        ]
    );
}

#[test]
fn a_failed_stage_changes_nothing() {
    // A local-table sync or map write that fails is a failed eBPF stage.
    let mut r = rig(&[(LayerKind::Bpf, Step::Stage)]);
    let e = run(&mut r, LayerSet::Both).expect_err("fails");
    assert!(!e.changed);
    assert!(
        format!("{:#}", e.error).contains("policy in force is unchanged"),
        "{:#}",
        e.error
    );
    assert_eq!(enforced(&r), both("old"));
    let log = r.log.borrow();
    assert!(log.contains(&"Abandon nft".to_string()), "{log:?}");
    assert!(!log.iter().any(|l| l.starts_with("Commit")), "{log:?}");
}

#[test]
fn a_failed_nft_commit_leaves_the_previous_policy() {
    let mut r = rig(&[(LayerKind::Nft, Step::Commit)]);
    let e = run(&mut r, LayerSet::Both).expect_err("fails");
    assert!(!e.changed);
    assert_eq!(enforced(&r), both("old"));
    assert!(r.log.borrow().contains(&"Abandon bpf".to_string()));
}

#[test]
fn a_failed_flip_after_the_nft_commit_restores_the_previous_table() {
    let mut r = rig(&[(LayerKind::Bpf, Step::Commit)]);
    let e = run(&mut r, LayerSet::Both).expect_err("fails");
    assert!(e.changed, "nft was committed, then rolled back");
    assert!(
        format!("{:#}", e.error).contains("previous policy is back in force"),
        "{:#}",
        e.error
    );
    assert_eq!(enforced(&r), both("old"));
    assert!(r.log.borrow().contains(&"RollBack nft".to_string()));
}

#[test]
fn a_failed_roll_back_says_the_layers_may_disagree() {
    let mut r = rig(&[
        (LayerKind::Bpf, Step::Commit),
        (LayerKind::Nft, Step::RollBack),
    ]);
    let e = run(&mut r, LayerSet::Both).expect_err("fails");
    assert!(e.changed);
    assert!(
        format!("{:#}", e.error).contains("may now disagree"),
        "{:#}",
        e.error
    );
}

#[test]
fn an_unavailable_layer_is_skipped_only_when_several_were_asked_for() {
    let mut r = rig(&[(LayerKind::Nft, Step::Available)]);
    assert_eq!(run(&mut r, LayerSet::Both).expect("ok"), [LayerKind::Bpf]);
    // The layer left out is removed after the other is in force.
    assert_eq!(
        enforced(&r),
        [(LayerKind::Bpf, Some("new".into())), (LayerKind::Nft, None)]
    );

    let mut r = rig(&[(LayerKind::Nft, Step::Available)]);
    let e = run(&mut r, LayerSet::Nft).expect_err("nft alone was asked for");
    assert!(!e.changed);
    assert_eq!(enforced(&r), both("old"));
}

#[test]
fn a_layer_not_asked_for_is_removed_after_the_commit() {
    let mut r = rig(&[]);
    assert_eq!(run(&mut r, LayerSet::Bpf).expect("ok"), [LayerKind::Bpf]);
    assert_eq!(
        enforced(&r),
        [(LayerKind::Bpf, Some("new".into())), (LayerKind::Nft, None)]
    );
    let log = r.log.borrow();
    let commit = log
        .iter()
        .position(|l| l == "Commit bpf")
        .expect("committed");
    let remove = log.iter().position(|l| l == "Remove nft").expect("removed");
    assert!(commit < remove, "{log:?}");
}

#[test]
fn no_layer_at_all_is_an_error() {
    let mut r = rig(&[
        (LayerKind::Nft, Step::Available),
        (LayerKind::Bpf, Step::Available),
    ]);
    let e = run(&mut r, LayerSet::Both).expect_err("nothing to enforce with");
    assert!(format!("{:#}", e.error).contains("no enforcement layer"));
    assert_eq!(enforced(&r), both("old"));
}

#[test]
fn cgroup_lists_need_a_layer_that_judges_cgroups() {
    let mut with_cgroups = plan("new");
    with_cgroups.uid_sets = vec![Vec::new()];
    with_cgroups.cgroup_sets = vec![vec![crate::policy::ResolvedCgroup {
        path: crate::policy::CgroupPath::new("app.slice").expect("path"),
        id: Some(7),
    }]];
    let mut r = rig(&[]);
    let e = run_plan(&mut r, LayerSet::Nft, &with_cgroups).expect_err("refused");
    assert!(!e.changed);
    assert!(format!("{:#}", e.error).contains("--layers bpf or both"));
    assert_eq!(enforced(&r), both("old"), "the policy in force stays");
    assert!(!r.log.borrow().iter().any(|l| l.starts_with("Stage")));
    let mut r = rig(&[]);
    run_plan(&mut r, LayerSet::Both, &with_cgroups).expect("both judge together");
    assert_eq!(enforced(&r), both("new"));
}
