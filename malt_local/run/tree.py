"""The MALT tree: n generator answers, n critiques each, n refinements each, graded and valued.

The scheduler looks at what the database already holds for a run, asks the engine only for the
nodes that are missing (a node's children are requested as soon as it is stored), stores each
completion the moment it arrives, grades the leaves, and assigns credit to a question's whole
tree once its last leaf is in. Everything it does is idempotent: a killed run re-planned from
the database continues where it stopped.

With per-role LoRA adapters (`malt run --adapters`) llama.cpp applies one adapter stack per
context, so the tree is built role by role over a wave of questions: every missing generator node
of the wave under the generator's stack, then every critique under the verifier's, then every
refinement under the refiner's. A role's n siblings still share their prompt's prefill (one
request, n seeds); what is lost is the reuse of a parent's KV cache by its children, which was
computed under another role's adapters and is not valid under these.

Several processes may build one run together (one per GPU): a question's tree is built by the
process that holds its claim (malt_local.db.claims). A process claims the next question only when
its engine has room for more work and nothing else queued, plans the question from what is
stored once the claim is held, and stores each node only while it still holds the claim.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from malt_local.db.claims import CLAIM_RETRY, ClaimCursor, ClaimingQueue, Claims
from malt_local.db.store import NodeRecord, Store, node_id, utcnow
from malt_local.engines.base import Completion, Engine, GenRequest, RequestQueue, SamplingParams
from malt_local.progress import Progress
from malt_local.prompts import PromptSet, TreeContext
from malt_local.questions.loading import Question
from malt_local.roles import ROLES, NodePath, role_at, tree_size
from malt_local.run import credit
from malt_local.run.settings import Run
from malt_local.tasks import RuleLess, SlowGrading, get_task
from malt_local.tasks.pool import GradingPool


def derive_seed(run_seed: int, question_id: str, path: NodePath) -> int:
    """Each node's own seed, from the run seed and its place in the tree (stable across runs)."""
    text = f"{run_seed}:{question_id}:{'.'.join(map(str, path))}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


# The task whose leaves the LLM judge rewards (malt_local.run.judge), not a deterministic grader.
JUDGE_TASK = "judge"


def assign_question_credit(
    store: Store, run_id: str, question_id: str, n: int, theta: float
) -> bool:
    """Values and labels for one question's tree, once every leaf has its reward.

    Returns False (and writes nothing) while a leaf is missing or not yet rewarded: with
    `--task judge` a leaf's reward is NULL until the judge has graded it, and a value computed
    without it would be stored as if it were final.
    """
    rewards: dict[NodePath, float] = {}
    ids: dict[NodePath, str] = {}
    for r in store.nodes(run_id, question_id):
        ids[r.branches] = r.id
        if r.depth == 3:
            if r.reward is None:
                return False
            rewards[r.branches] = r.reward
    if len(rewards) != n**3:
        return False
    values = credit.assign(rewards, n, theta)
    store.set_credit(
        (ids[path], c.value, int(c.label)) for path, c in values.items() if path in ids
    )
    return True


# Questions claimed and built together when roles have their own adapters: each role's turn of a
# wave is one `generate` call, so the wave is what one adapter switch is amortised over.
WAVE = 64


class _ByRole(RequestQueue):
    """Requests held per role until that role's turn of the wave (adapters mode).

    It stands where the claiming queue stands otherwise: the planner and `_on_completion` push
    into it, and `take` hands one role's requests to the engine as a queue of their own.
    """

    def __init__(self) -> None:
        super().__init__()
        self._held: dict[str, RequestQueue] = {role: RequestQueue() for role in ROLES}

    def push(self, request: GenRequest, priority: tuple = ()) -> None:
        assert request.role is not None
        self._held[request.role].push(request, priority)

    def take(self, role: str) -> RequestQueue:
        queue, self._held[role] = self._held[role], RequestQueue()
        return queue

    def __len__(self) -> int:
        return sum(len(q) for q in self._held.values())


@dataclass
class _Pending:
    question: Question
    qindex: int
    path: NodePath
    messages: list[dict[str, str]]
    seed: int


class TreeRunner:
    """Builds the trees of one run over a list of questions."""

    def __init__(
        self,
        store: Store,
        run: Run,
        questions: list[Question],
        engine: Engine,
        prompts: PromptSet,
        on_progress: Callable[[Progress], None] | None = None,
        *,
        role_adapters: dict[str, list[tuple[object, float]]] | None = None,
        wave: int = WAVE,
    ) -> None:
        """`role_adapters` (role -> loaded (handle, scale) stack; a role left out uses the base
        weights) builds the trees role by role in waves of `wave` questions; the engine must
        then be an `AdapterEngine`."""
        spec = run.spec
        self.store = store
        self.run_id = run.id
        self.n = spec.n
        self.theta = spec.theta
        self.seed = spec.seed
        self.params = SamplingParams(
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            max_tokens=spec.max_tokens,
            ignore_eos=bool(spec.ignore_eos),
        )
        self.questions = questions
        self._qindex = {q.id: i for i, q in enumerate(questions)}
        self.engine = engine
        self.prompts = prompts
        self.on_progress = on_progress
        self._pending: dict[str, _Pending] = {}
        self._leaves: dict[str, int] = {}
        self.claims = Claims(store, "tree", self.run_id)
        self.role_adapters = role_adapters
        self.wave = max(1, wave)
        self._by_role = _ByRole() if role_adapters is not None else None
        self.queue: RequestQueue = (
            ClaimingQueue(self._claim_next) if self._by_role is None else self._by_role
        )
        self._cursor: ClaimCursor | None = None
        self._next_try = 0.0
        # Slow graders (the code task) run here, beside generation; the store is written from
        # this thread only, when a grade is collected.
        self._grades: GradingPool[tuple[str, Question, bool]] = GradingPool()

    # planning -----------------------------------------------------------------------------

    def plan(self) -> Progress:
        """Count what is stored, credit finished trees, and line up the unfinished ones.

        Their requests are queued when their claims are taken (`_claim_next`).
        """
        done = 0
        unfinished = []
        for q in self.questions:
            stored = self.store.nodes(self.run_id, q.id)
            leaves = 0
            for r in stored:
                done += 1
                leaves += r.depth == 3
            if leaves == self.n**3:
                self._assign_credit(q)
            else:
                unfinished.append(q.id)
        self._regrade_pending()
        progress = Progress(total=tree_size(self.n) * len(self.questions), done=done, stage="trees")
        progress.questions_complete = len(self.questions) - len(unfinished)
        self.claims.reopen(unfinished)
        self._cursor = ClaimCursor(self.claims, unfinished)
        return progress

    def _claim_next(self) -> bool:
        """Claim the next free unfinished question and queue its missing nodes."""
        assert self._cursor is not None
        now = time.monotonic()
        if now < self._next_try:
            return False
        while (qid := self._cursor.next()) is not None:
            if self._plan_question(self.questions[self._qindex[qid]]):
                return True
        self._next_try = now + CLAIM_RETRY
        return False

    def _plan_question(self, q: Question) -> bool:
        """Queue a request for every missing node whose parent is stored; False when none is
        missing (another process finished the tree but not its claim): credit it, mark it done."""
        qi = self._qindex[q.id]
        stored = {r.branches: r for r in self.store.nodes(self.run_id, q.id)}
        self._leaves[q.id] = sum(1 for p in stored if len(p) == 3)
        if self._leaves[q.id] == self.n**3:
            self._assign_credit(q)
            self.claims.finish(q.id)
            return False
        self._request_children(q, qi, (), None, stored)
        for path, record in sorted(stored.items()):
            if len(path) < 3:
                self._request_children(q, qi, path, record, stored)
        return True

    def _request_children(
        self,
        q: Question,
        qi: int,
        path: NodePath,
        parent: NodeRecord | None,
        stored: dict[NodePath, NodeRecord],
    ) -> None:
        depth = len(path) + 1
        missing = [b for b in range(self.n) if path + (b,) not in stored]
        if not missing:
            return
        role = role_at(depth)
        if parent is None:
            ctx = TreeContext(q)
        elif depth == 2:
            ctx = TreeContext(q, generation=parent.output)
        else:
            ctx = TreeContext(q, generation=stored[path[:1]].output, critique=parent.output)
        messages = self.prompts.messages(role, ctx)
        keys, seeds = [], []
        for b in missing:
            child = path + (b,)
            key = node_id(self.run_id, q.id, child)
            seed = derive_seed(self.seed, q.id, child)
            self._pending[key] = _Pending(q, qi, child, messages, seed)
            keys.append(key)
            seeds.append(seed)
        self.queue.push(
            GenRequest(
                messages=messages,
                keys=keys,
                seeds=seeds,
                params=self.params,
                # By role, a parent's cache was made under another role's adapters. A child
                # role with a conversation of its own (`PromptSet.fresh`) shares no more than a
                # few tokens of its parent's prompt: keeping the parent's cells would only cost
                # room.
                parent_key=parent.id if parent and self._by_role is None else None,
                expects_children=depth < 3
                and self._by_role is None
                and not self.prompts.fresh(role_at(depth + 1), q.task),
                group=q.id,
                role=role,
            ),
            priority=(-depth, qi, path),
        )

    # execution ----------------------------------------------------------------------------

    def execute(self) -> Progress:
        """Generate every missing node; returns the final progress.

        Returns when every question is finished, by this process or another: while others hold
        unfinished questions, it waits, and takes over any whose holder stops renewing.
        """
        try:
            progress = self.plan()
            if self.on_progress:
                self.on_progress(progress)
            assert self._cursor is not None
            with self.claims:
                if self._by_role is not None:
                    self._execute_by_role(progress)
                else:
                    while True:
                        for completion in self.engine.generate(self.queue):
                            self._on_completion(completion, progress)
                        self._next_try = 0.0
                        if self._claim_next():
                            continue
                        if not self._cursor.waiting:
                            break
                        self._cursor.pause()
            self._collect_grades(wait=True)
        finally:
            self._grades.close()  # interrupted: what is not graded yet, the next run grades
        return self._recount(progress)

    # slow grading ---------------------------------------------------------------------------

    def _submit_grade(
        self, task: SlowGrading, text: str, q: Question, nid: str, leaf: bool
    ) -> None:
        self._grades.submit(task, text, q, (nid, q, leaf))

    def _regrade_pending(self) -> None:
        """Grade what a killed run stored but never graded (its `grade_reason` is NULL)."""
        slow = [q.id for q in self.questions if isinstance(get_task(q.task), SlowGrading)]
        if not slow:
            return
        for r in self.store.ungraded_nodes(self.run_id, slow):
            q = self.questions[self._qindex[r.question_id]]
            task = get_task(q.task)
            assert isinstance(task, SlowGrading)
            self._submit_grade(task, r.output, q, r.id, r.depth == 3)

    def _collect_grades(self, *, wait: bool = False) -> None:
        """Store the grades that are ready (all of them with `wait`), then credit every tree
        whose last leaf was just graded."""
        finished: set[str] = set()
        for (nid, q, leaf), g in self._grades.ready(wait=wait):
            reward = get_task(q.task).reward(g) if leaf else None
            correct = None if g.correct is None or (g.answer is None and not leaf) else g.correct
            self.store.set_grade(nid, g.answer, correct, reward, g.reason or "graded")
            if leaf:
                finished.add(q.id)
        for qid in finished:
            self._assign_credit(self.questions[self._qindex[qid]])

    def _execute_by_role(self, progress: Progress) -> None:
        """Claim a wave of questions, then build it one role at a time under its adapters."""
        assert self._by_role is not None and self.role_adapters is not None
        assert self._cursor is not None
        use_adapters = self.engine.use_adapters  # type: ignore[attr-defined]
        while True:
            self._next_try = 0.0
            claimed = 0
            while claimed < self.wave and self._claim_next():
                claimed += 1
            if not claimed:
                if not self._cursor.waiting:
                    return
                self._cursor.pause()
                continue
            for role in ROLES:  # a role's requests come from the one before it
                queue = self._by_role.take(role)
                if not len(queue):
                    continue
                use_adapters(self.role_adapters.get(role, []))
                for completion in self.engine.generate(queue):
                    self._on_completion(completion, progress)

    def _on_completion(self, completion: Completion, progress: Progress) -> None:
        self._collect_grades()
        record = self._store(completion)
        if record is None:
            return
        progress.done += 1
        progress.generated += 1
        progress.completion_tokens += completion.completion_tokens
        info_q = self._question_of(record)
        if record.depth < 3:
            stored = self._stored_path_map(info_q, record)
            self._request_children(info_q, self._qindex[info_q.id], record.branches, record, stored)
        else:
            self._leaves[info_q.id] += 1
            if self._leaves[info_q.id] == self.n**3:
                self._assign_credit(info_q)
                self.claims.finish(info_q.id)
                progress.questions_complete += 1
        if self.on_progress:
            self.on_progress(progress)

    def _recount(self, progress: Progress) -> Progress:
        """Stored nodes and finished trees of these questions, whoever built them."""
        done = complete = 0
        for q in self.questions:
            leaves = 0
            for r in self.store.nodes(self.run_id, q.id):
                done += 1
                leaves += r.depth == 3
            complete += leaves == self.n**3
        progress.done, progress.questions_complete = done, complete
        return progress

    def _question_of(self, record: NodeRecord) -> Question:
        return self.questions[self._qindex[record.question_id]]

    def _stored_path_map(self, q: Question, record: NodeRecord) -> dict[NodePath, NodeRecord]:
        """What `_request_children` needs: the node itself and, for a verifier, its generator."""
        out = {record.branches: record}
        if record.depth == 2:
            generator = self.store.node(node_id(self.run_id, q.id, record.branches[:1]))
            assert generator is not None, "a verifier is stored only after its generator"
            out[record.branches[:1]] = generator
        return out

    def _store(self, c: Completion) -> NodeRecord | None:
        """Store a completion as a node; None (and nothing stored) once the claim on its
        question was lost to another process."""
        info = self._pending.pop(c.key)
        q = info.question
        depth = len(info.path)
        is_leaf = depth == 3
        task = get_task(q.task)
        slow = isinstance(task, SlowGrading)
        # A slow grader's verdict comes from the pool later (`_collect_grades`).
        verdict = task.pending(c.text, q) if slow else task.grade(c.text, q)
        answer, correct = verdict.answer, verdict.correct
        if slow or isinstance(task, RuleLess):
            # Graded later: by the pool (slow) or the judge pass (no rule), reward and correct.
            correct = reward = None
        else:
            reward = task.reward(verdict) if is_leaf else None
        # `correct` is recorded for every leaf and for any node that states an answer.
        graded = None if correct is None or (answer is None and not is_leaf) else int(correct)
        record = NodeRecord(
            id=c.key,
            run_id=self.run_id,
            question_id=q.id,
            parent_id=node_id(self.run_id, q.id, info.path[:-1]) if depth > 1 else None,
            role=role_at(depth),
            depth=depth,
            branch=info.path[-1],
            path=".".join(map(str, info.path)),
            messages=json.dumps(info.messages, ensure_ascii=False),
            output=c.text,
            finish_reason=c.finish_reason,
            answer=answer,
            correct=graded,
            reward=reward,
            value=reward,
            label=int(credit.label_for(reward, self.theta)) if reward is not None else None,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            seed=info.seed if c.seed is None else c.seed,
            duration_ms=int(c.seconds * 1000),
            created_at=utcnow(),
            builder=self.claims.holder,
            grade_reason=verdict.reason,
        )
        with self.store.immediate():
            if not self.claims.keep(q.id):
                assert self._cursor is not None
                self._cursor.watch(q.id)
                return None
            self.store.insert_node(record)
        if slow:
            assert isinstance(task, SlowGrading)
            self._submit_grade(task, c.text, q, record.id, is_leaf)
        return record

    def _assign_credit(self, q: Question) -> None:
        assign_question_credit(self.store, self.run_id, q.id, self.n, self.theta)
