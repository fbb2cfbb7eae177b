//! One replication push as a state machine with no I/O: the order of the questions and the
//! decisions between them, driven by the agent over QUIC and its control socket, and by the
//! simulation over its simulated link and store. `poll` says what to do next (the same
//! `Action` until it is answered); each `handle_*` takes what came of it.
//!
//! ```text
//! AskNewest ─┬─ none ──────────────────────────────────────────────┐ (a first full)
//!            ├─ forced resync ───────────────── FetchDigests ── Push(Compare)
//!            └─ AskAnswerable(newest) ─ no ──── FetchDigests ─┘
//!                                    └─ yes ─ [AskResume ─ AskAnswerable(prior) ─ Push(Resume)]
//!                                             [AskUnchanged(newest) ─ yes ─ Done(InSync)]
//!                                             Push(Since)
//! Push ─ committed the pushed cut ─ MoveCursor(cut) ─ Done(Committed)
//!      ─ the receiver moved on, or a retryable loss ─ AskNewest again (3 tries in all)
//!      ─ anything else ─ Done(Failed): the cursor does not move
//! ```
//!
//! The one rule the order exists for: `MoveCursor` names only a cut the receiver has
//! acknowledged as committed.

use crate::wire::{Response, ResumeState};
use crate::{ChangeId, Since};

use super::{AfterPush, after_push, judge_resume_state};

/// Most tries of one push (a try is a new cut): the receiver may move on between the
/// question of where it stands and the push.
const TRIES_MAX: u32 = 3;

/// What to send on top of the receiver's newest point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The changes since the receiver's newest point, or everything for a first full.
    Since(Since),
    /// The rest of the receiver's cut-off push of cut `prior`, which holds every record
    /// below `next_offset`, on top of `since`.
    Resume {
        since: Since,
        prior: ChangeId,
        next_offset: u64,
    },
    /// A resync: every unit whose hash differs from the receiver's hashes of its point `base`.
    Compare { base: ChangeId },
}

/// What the driver does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask the receiver for its newest point: `handle_newest`.
    AskNewest,
    /// Ask the agent's tracker whether it can name the changes since this cut:
    /// `handle_answerable`.
    AskAnswerable(ChangeId),
    /// Ask the receiver for the resume state of a cut-off push: `handle_resume`.
    AskResume,
    /// Ask the agent whether anything was written since this cut: `handle_unchanged`.
    AskUnchanged(ChangeId),
    /// Fetch the receiver's unit hashes of its newest point: `handle_digests`.
    FetchDigests(ChangeId),
    /// Cut, export as planned, push, and bring back the receiver's answer: `handle_pushed`,
    /// or `handle_push_lost` if no answer came.
    Push(Plan),
    /// Move the agent's replica cursor to this cut, which the receiver committed:
    /// `handle_cursor_moved`.
    MoveCursor(ChangeId),
    /// The push is over.
    Done(Outcome),
}

/// How a push ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The pushed cut is committed on the receiver (`already`: it was before this push), and
    /// the cursor names it.
    Committed { point: ChangeId, already: bool },
    /// Nothing was written since the receiver's newest point: nothing pushed.
    InSync { point: ChangeId },
    /// Not committed; the cursor stays where it was.
    Failed(String),
}

/// What the session decided on the way, for the driver's log and report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// The agent cannot name the changes since the receiver's point: a resync instead.
    NotAnswerable { point: ChangeId, why: String },
    /// The receiver's resume state is not continued.
    ResumeRefused(String),
    /// The receiver's cut-off push is continued.
    Resuming { prior: ChangeId, next_offset: u64 },
    /// The receiver moved on, or the push was lost: another try.
    Again(String),
}

#[derive(Clone, Debug)]
enum State {
    Newest,
    Answerable(ChangeId),
    Resume,
    ResumeAnswerable { prior: ChangeId, next_offset: u64 },
    Unchanged(ChangeId),
    Digests(ChangeId),
    Pushing(Plan),
    Cursor { point: ChangeId, already: bool },
    Done(Outcome),
}

/// A deliberate mistake in the order, to show the simulation catches it (feature
/// `mutants`, which the simulation turns on; the agent never selects one).
#[cfg(feature = "mutants")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutant {
    /// Move the cursor to an exported cut whose push got no commit.
    CursorBeforeAck,
}

/// One push; see the module's doc.
#[derive(Clone, Debug)]
pub struct Session {
    state: State,
    disk_size: u64,
    ask_resume: bool,
    force_resync: bool,
    may_skip: bool,
    tries: u32,
    newest: Option<ChangeId>,
    resume_asked: bool,
    last_plan: Option<Plan>,
    notes: Vec<Note>,
    #[cfg(feature = "mutants")]
    mutant: Option<Mutant>,
}

impl Session {
    /// A push of a disk of `disk_size` bytes. `ask_resume`: ask the receiver for a cut-off
    /// push's resume state (at the start of a run and after a failure; a commit drops the
    /// receiver's state). `force_resync`: compare digests even when the changes can be
    /// named. `may_skip`: the cut would be crash-consistent, so a disk with nothing written
    /// since the receiver's point is not pushed (an application cut is: quiescing may write,
    /// and its label is news).
    pub fn new(disk_size: u64, ask_resume: bool, force_resync: bool, may_skip: bool) -> Session {
        Session {
            state: State::Newest,
            disk_size,
            ask_resume,
            force_resync,
            may_skip,
            tries: 1,
            newest: None,
            resume_asked: false,
            last_plan: None,
            notes: Vec::new(),
            #[cfg(feature = "mutants")]
            mutant: None,
        }
    }

    /// The same session, with a deliberate mistake in it.
    #[cfg(feature = "mutants")]
    pub fn with_mutant(mut self, mutant: Mutant) -> Session {
        self.mutant = Some(mutant);
        self
    }

    /// What to do next.
    pub fn poll(&self) -> Action {
        match &self.state {
            State::Newest => Action::AskNewest,
            State::Answerable(id) => Action::AskAnswerable(*id),
            State::Resume => Action::AskResume,
            State::ResumeAnswerable { prior, .. } => Action::AskAnswerable(*prior),
            State::Unchanged(id) => Action::AskUnchanged(*id),
            State::Digests(id) => Action::FetchDigests(*id),
            State::Pushing(plan) => Action::Push(plan.clone()),
            State::Cursor { point, .. } => Action::MoveCursor(*point),
            State::Done(outcome) => Action::Done(outcome.clone()),
        }
    }

    /// The receiver's newest committed point of the disk (none: an empty store).
    pub fn handle_newest(&mut self, newest: Option<ChangeId>) {
        if !matches!(self.state, State::Newest) {
            return self.out_of_turn("the newest point");
        }
        self.newest = newest;
        self.state = match newest {
            None => self.after_plan(),
            Some(id) if self.force_resync => State::Digests(id),
            Some(id) => State::Answerable(id),
        };
    }

    /// Whether the agent can name the changes since the cut `poll` asked about (`Err`: why
    /// not).
    pub fn handle_answerable(&mut self, answer: Result<(), String>) {
        self.state = match (std::mem::replace(&mut self.state, State::Newest), answer) {
            (State::Answerable(_), Ok(())) => self.after_plan(),
            (State::Answerable(id), Err(why)) => {
                self.notes.push(Note::NotAnswerable { point: id, why });
                State::Digests(id)
            }
            (State::ResumeAnswerable { prior, next_offset }, Ok(())) => {
                self.notes.push(Note::Resuming { prior, next_offset });
                self.push(Plan::Resume {
                    since: self.newest.map_or(Since::All, Since::Id),
                    prior,
                    next_offset,
                })
            }
            (State::ResumeAnswerable { prior, .. }, Err(why)) => {
                self.notes.push(Note::ResumeRefused(format!(
                    "this agent cannot name the changes since its cut {prior}: {why}"
                )));
                self.unchanged_or_push()
            }
            (other, _) => {
                self.state = other;
                return self.out_of_turn("an answerable");
            }
        };
    }

    /// The receiver's resume state of a cut-off push of the disk, if it kept one.
    pub fn handle_resume(&mut self, state: Option<ResumeState>) {
        if !matches!(self.state, State::Resume) {
            return self.out_of_turn("a resume state");
        }
        let newest = self.newest;
        self.state = match state
            .map(|s| judge_resume_state(&s, newest, self.disk_size).map(|p| (p, s.next_offset)))
        {
            None => self.unchanged_or_push(),
            Some(Ok((prior, next_offset))) => State::ResumeAnswerable { prior, next_offset },
            Some(Err(why)) => {
                self.notes.push(Note::ResumeRefused(why));
                self.unchanged_or_push()
            }
        };
    }

    /// Whether nothing was written since the receiver's newest point.
    pub fn handle_unchanged(&mut self, unchanged: bool) {
        let State::Unchanged(point) = self.state else {
            return self.out_of_turn("an unchanged");
        };
        self.state = if unchanged {
            State::Done(Outcome::InSync { point })
        } else {
            self.push(Plan::Since(Since::Id(point)))
        };
    }

    /// The receiver's hashes were fetched: of its point `of` (`Err`: why they could not be).
    pub fn handle_digests(&mut self, of: Result<ChangeId, String>) {
        let State::Digests(base) = self.state else {
            return self.out_of_turn("digests");
        };
        self.state = match of {
            Ok(of) if of == base => self.push(Plan::Compare { base }),
            Ok(of) => State::Done(Outcome::Failed(format!(
                "the receiver moved from {base} to {of} while asked for its digests"
            ))),
            Err(why) => State::Done(Outcome::Failed(why)),
        };
    }

    /// The push of cut `to` was answered.
    pub fn handle_pushed(&mut self, to: ChangeId, answer: &Response) {
        if !matches!(self.state, State::Pushing(_)) {
            return self.out_of_turn("a push's answer");
        }
        self.state = match after_push(answer, to) {
            AfterPush::Committed { already, .. } => State::Cursor { point: to, already },
            AfterPush::Retry(why) => self.again(why, Some(to)),
            AfterPush::Failed(why) => self.failed(why, Some(to)),
        };
    }

    /// The push got no answer (the link dropped, the export failed; `exported`: the cut it
    /// was of, if one was taken). `retry`: the driver can try again (an older receiver
    /// refused multi-stream pushes, say).
    pub fn handle_push_lost(&mut self, why: String, retry: bool, exported: Option<ChangeId>) {
        if !matches!(self.state, State::Pushing(_)) {
            return self.out_of_turn("a lost push");
        }
        self.state = if retry {
            self.again(why, exported)
        } else {
            self.failed(why, exported)
        };
    }

    /// The cursor names the committed point.
    pub fn handle_cursor_moved(&mut self) {
        let State::Cursor { point, already } = self.state else {
            return self.out_of_turn("a cursor move");
        };
        self.state = State::Done(Outcome::Committed { point, already });
    }

    /// Whether the receiver was asked for a resume state.
    pub fn resume_asked(&self) -> bool {
        self.resume_asked
    }

    /// The plan of the last push tried.
    pub fn plan(&self) -> Option<&Plan> {
        self.last_plan.as_ref()
    }

    /// The receiver's newest point when the last try started.
    pub fn newest(&self) -> Option<ChangeId> {
        self.newest
    }

    /// What was decided since the last call.
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    /// A full, or an increment the agent can name: the resume question first, when asked.
    fn after_plan(&mut self) -> State {
        if self.ask_resume {
            self.resume_asked = true;
            State::Resume
        } else {
            self.unchanged_or_push()
        }
    }

    /// A plain increment is pushed only if something changed (when that may be skipped).
    fn unchanged_or_push(&mut self) -> State {
        match self.newest {
            Some(point) if self.may_skip => State::Unchanged(point),
            newest => self.push(Plan::Since(newest.map_or(Since::All, Since::Id))),
        }
    }

    fn push(&mut self, plan: Plan) -> State {
        self.last_plan = Some(plan.clone());
        State::Pushing(plan)
    }

    fn again(&mut self, why: String, exported: Option<ChangeId>) -> State {
        if self.tries >= TRIES_MAX {
            return self.failed(why, exported);
        }
        self.tries += 1;
        self.notes.push(Note::Again(why));
        State::Newest
    }

    fn failed(&mut self, why: String, exported: Option<ChangeId>) -> State {
        #[cfg(feature = "mutants")]
        if let (Some(Mutant::CursorBeforeAck), Some(cut)) = (self.mutant, exported) {
            return State::Cursor {
                point: cut,
                already: false,
            };
        }
        let _ = exported;
        State::Done(Outcome::Failed(why))
    }

    /// An answer to a question that was not asked: a bug of the driver, which ends the push
    /// without moving anything.
    fn out_of_turn(&mut self, what: &str) {
        debug_assert!(false, "{what} handed to a push in state {:?}", self.state);
        self.state = State::Done(Outcome::Failed(format!(
            "internal error: {what} out of turn"
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Generation;
    use crate::wire::Refusal;

    fn id(seq: u64) -> ChangeId {
        ChangeId::new(Generation(9), seq)
    }

    fn committed(to: ChangeId) -> Response {
        Response::Committed {
            change_id: to,
            already: false,
        }
    }

    #[test]
    fn a_first_full_then_an_increment_move_the_cursor_only_after_the_commit() {
        let mut s = Session::new(1 << 20, false, false, true);
        assert_eq!(s.poll(), Action::AskNewest);
        s.handle_newest(None);
        assert_eq!(s.poll(), Action::Push(Plan::Since(Since::All)));
        s.handle_pushed(id(1), &committed(id(1)));
        assert_eq!(s.poll(), Action::MoveCursor(id(1)));
        s.handle_cursor_moved();
        assert_eq!(
            s.poll(),
            Action::Done(Outcome::Committed {
                point: id(1),
                already: false
            })
        );

        let mut s = Session::new(1 << 20, false, false, true);
        s.handle_newest(Some(id(1)));
        assert_eq!(s.poll(), Action::AskAnswerable(id(1)));
        s.handle_answerable(Ok(()));
        assert_eq!(s.poll(), Action::AskUnchanged(id(1)));
        s.handle_unchanged(false);
        assert_eq!(s.poll(), Action::Push(Plan::Since(Since::Id(id(1)))));
        // Refused: no cursor move, ever.
        s.handle_pushed(
            id(2),
            &Response::Refused {
                refusal: Refusal::Damaged,
                message: "crc".into(),
            },
        );
        assert!(matches!(s.poll(), Action::Done(Outcome::Failed(_))));
    }

    #[test]
    fn an_unchanged_disk_is_in_sync_and_an_application_cut_is_pushed_anyway() {
        let mut s = Session::new(1 << 20, false, false, true);
        s.handle_newest(Some(id(4)));
        s.handle_answerable(Ok(()));
        s.handle_unchanged(true);
        assert_eq!(s.poll(), Action::Done(Outcome::InSync { point: id(4) }));
        let mut s = Session::new(1 << 20, false, false, false);
        s.handle_newest(Some(id(4)));
        s.handle_answerable(Ok(()));
        assert_eq!(s.poll(), Action::Push(Plan::Since(Since::Id(id(4)))));
    }

    #[test]
    fn a_lost_journal_or_a_forced_resync_compares_digests() {
        let mut s = Session::new(1 << 20, true, false, true);
        s.handle_newest(Some(id(4)));
        s.handle_answerable(Err("another generation".into()));
        assert_eq!(s.poll(), Action::FetchDigests(id(4)));
        assert!(matches!(&s.take_notes()[..], [Note::NotAnswerable { .. }]));
        s.handle_digests(Ok(id(4)));
        assert_eq!(s.poll(), Action::Push(Plan::Compare { base: id(4) }));
        // Digests of another point than asked: the receiver moved; nothing is pushed.
        let mut s = Session::new(1 << 20, false, true, true);
        s.handle_newest(Some(id(4)));
        s.handle_digests(Ok(id(5)));
        assert!(matches!(s.poll(), Action::Done(Outcome::Failed(_))));
    }

    #[test]
    fn a_fitting_resume_state_is_continued_and_a_foreign_one_is_not() {
        let state = |from: Option<ChangeId>, to: ChangeId| ResumeState {
            from,
            to,
            disk_size: 1 << 20,
            next_offset: 8192,
        };
        let mut s = Session::new(1 << 20, true, false, true);
        s.handle_newest(Some(id(4)));
        s.handle_answerable(Ok(()));
        assert_eq!(s.poll(), Action::AskResume);
        s.handle_resume(Some(state(Some(id(4)), id(6))));
        assert_eq!(s.poll(), Action::AskAnswerable(id(6)));
        s.handle_answerable(Ok(()));
        assert_eq!(
            s.poll(),
            Action::Push(Plan::Resume {
                since: Since::Id(id(4)),
                prior: id(6),
                next_offset: 8192
            })
        );
        assert!(s.resume_asked());
        assert!(matches!(s.plan(), Some(Plan::Resume { prior, .. }) if *prior == id(6)));
        // A state that starts elsewhere is not trusted: a plain push, unless unchanged.
        let mut s = Session::new(1 << 20, true, false, true);
        s.handle_newest(Some(id(4)));
        s.handle_answerable(Ok(()));
        s.handle_resume(Some(state(Some(id(3)), id(6))));
        assert_eq!(s.poll(), Action::AskUnchanged(id(4)));
        assert!(matches!(&s.take_notes()[..], [Note::ResumeRefused(_)]));
    }

    #[test]
    fn a_receiver_that_moved_on_is_asked_again_three_times_at_most() {
        let moved = Response::Refused {
            refusal: Refusal::Mismatch,
            message: "moved".into(),
        };
        let mut s = Session::new(1 << 20, false, false, false);
        for t in 0..3 {
            assert_eq!(s.poll(), Action::AskNewest, "try {t}");
            s.handle_newest(None);
            s.handle_pushed(id(t + 1), &moved);
        }
        assert!(matches!(s.poll(), Action::Done(Outcome::Failed(_))));
        // A commit of another cut than the pushed one never moves the cursor.
        let mut s = Session::new(1 << 20, false, false, false);
        s.handle_newest(None);
        s.handle_pushed(id(2), &committed(id(3)));
        assert!(matches!(s.poll(), Action::Done(Outcome::Failed(_))));
        // A lost push: tried again when the driver says it can, else failed.
        let mut s = Session::new(1 << 20, false, false, false);
        s.handle_newest(None);
        s.handle_push_lost("old receiver".into(), true, None);
        assert_eq!(s.poll(), Action::AskNewest);
        s.handle_newest(None);
        s.handle_push_lost("link cut".into(), false, Some(id(2)));
        assert!(matches!(s.poll(), Action::Done(Outcome::Failed(_))));
    }
}
