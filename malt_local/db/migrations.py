"""The database schema, as an ordered list of migrations.

Shipped migration names are never renamed or reordered: sqlite-utils records each applied name in
`_sqlite_migrations`, and a database made by an older malt is brought up to date by running the
ones it lacks. Every schema change is a new function at the end.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("malt")


def known_names() -> set[str]:
    """The migrations this malt knows; a database that applied others is from a newer malt."""
    return {m.name for m in migrations._migrations}


@migrations()
def m001_initial(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            model TEXT NOT NULL,
            model_sha256 TEXT,
            n INTEGER NOT NULL,
            temperature REAL NOT NULL,
            top_p REAL NOT NULL,
            top_k INTEGER NOT NULL,
            max_tokens INTEGER NOT NULL,
            seed INTEGER NOT NULL,
            theta REAL NOT NULL,
            task TEXT,
            prompts_sha256 TEXT NOT NULL,
            prompt_hashes TEXT NOT NULL,
            tool_version TEXT NOT NULL,
            config TEXT NOT NULL
        )"""
    )
    db.execute(
        """
        CREATE TABLE questions (
            id TEXT PRIMARY KEY,
            task TEXT NOT NULL,
            question TEXT NOT NULL,
            ground_truth TEXT NOT NULL,
            options TEXT,
            source TEXT,
            metadata TEXT,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute(
        """
        CREATE TABLE run_questions (
            run_id TEXT NOT NULL REFERENCES runs(id),
            question_id TEXT NOT NULL REFERENCES questions(id),
            position INTEGER NOT NULL,
            PRIMARY KEY (run_id, question_id)
        )"""
    )
    db.execute(
        """
        CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            question_id TEXT NOT NULL REFERENCES questions(id),
            parent_id TEXT REFERENCES nodes(id),
            role TEXT NOT NULL CHECK (role IN ('generator', 'verifier', 'refiner')),
            depth INTEGER NOT NULL,
            branch INTEGER NOT NULL,
            path TEXT NOT NULL,
            messages TEXT NOT NULL,
            output TEXT NOT NULL,
            finish_reason TEXT NOT NULL,
            answer TEXT,
            correct INTEGER,
            reward REAL,
            value REAL,
            label INTEGER,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            seed INTEGER NOT NULL,
            duration_ms INTEGER,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX nodes_run_question ON nodes(run_id, question_id)")
    db.execute("CREATE INDEX nodes_parent ON nodes(parent_id)")
    db.execute("CREATE INDEX nodes_run_role ON nodes(run_id, role)")


@migrations()
def m003_eval(db: Database) -> None:
    """`malt eval`: evaluation runs, their adapter sets, sampled questions and every turn.

    An eval run's id is a hash of what shapes its generations (model sha256, sampling, seed,
    task, prompts), so the same command resumes it; a generation's id is its place (run,
    adapter set, seed index, question, pass, role), so a resumed evaluation cannot store one
    twice. `adapter_set` is 'base' (no adapters) or 'lora-<digest>' of the role adapters.
    """
    db.execute(
        """
        CREATE TABLE eval_runs (
            id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            model TEXT NOT NULL,
            model_sha256 TEXT NOT NULL,
            temperature REAL NOT NULL,
            top_p REAL NOT NULL,
            top_k INTEGER NOT NULL,
            max_tokens INTEGER NOT NULL,
            seed INTEGER NOT NULL,
            task TEXT,
            prompts_sha256 TEXT NOT NULL,
            prompt_hashes TEXT NOT NULL,
            tool_version TEXT NOT NULL,
            config TEXT NOT NULL
        )"""
    )
    db.execute(
        """
        CREATE TABLE eval_adapter_sets (
            eval_run_id TEXT NOT NULL REFERENCES eval_runs(id),
            id TEXT NOT NULL,
            adapters TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (eval_run_id, id)
        )"""
    )
    db.execute(
        """
        CREATE TABLE eval_samples (
            eval_run_id TEXT NOT NULL REFERENCES eval_runs(id),
            benchmark TEXT NOT NULL,
            seed_index INTEGER NOT NULL,
            position INTEGER NOT NULL,
            question_id TEXT NOT NULL REFERENCES questions(id),
            PRIMARY KEY (eval_run_id, benchmark, seed_index, position)
        )"""
    )
    db.execute(
        """
        CREATE TABLE eval_generations (
            id TEXT PRIMARY KEY,
            eval_run_id TEXT NOT NULL REFERENCES eval_runs(id),
            adapter_set TEXT NOT NULL,
            seed_index INTEGER NOT NULL,
            question_id TEXT NOT NULL REFERENCES questions(id),
            pass_index INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('generator', 'verifier', 'refiner')),
            parent_id TEXT REFERENCES eval_generations(id),
            messages TEXT NOT NULL,
            output TEXT NOT NULL,
            finish_reason TEXT NOT NULL,
            answer TEXT,
            correct INTEGER,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            seed INTEGER NOT NULL,
            duration_ms INTEGER,
            created_at TEXT NOT NULL,
            FOREIGN KEY (eval_run_id, adapter_set) REFERENCES eval_adapter_sets(eval_run_id, id)
        )"""
    )
    db.execute(
        "CREATE INDEX eval_generations_place ON eval_generations"
        "(eval_run_id, adapter_set, seed_index, question_id)"
    )
    db.execute("CREATE INDEX eval_generations_parent ON eval_generations(parent_id)")


@migrations()
def m002_judgements(db: Database) -> None:
    """`malt run --judge`: one LLM judgement per judged node (the refiner leaves).

    Kept out of `nodes` so a run without a judge has no empty columns and a judgement can be
    added to a finished tree later. `explanation` is plain text; `key_matches` a JSON list of
    strings; the scores are in [0, 1]. `model` is the judge model's file name and
    `model_sha256` its digest, so judgements from two judges are never mixed up silently.
    """
    db.execute(
        """
        CREATE TABLE judgements (
            node_id TEXT PRIMARY KEY REFERENCES nodes(id),
            run_id TEXT NOT NULL REFERENCES runs(id),
            correctness_score REAL,
            reasoning_score REAL,
            explanation TEXT,
            key_matches TEXT,
            valid INTEGER NOT NULL,
            output TEXT NOT NULL,
            model TEXT NOT NULL,
            model_sha256 TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            duration_ms INTEGER,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX judgements_run ON judgements(run_id)")


@migrations()
def m004_claims(db: Database) -> None:
    """Several `malt run`/`malt eval` processes on one database (one per GPU): who builds what.

    A claim row says which process (`holder`: host:pid:token) builds one item of a run: a
    question's tree (scope 'tree'), its judge verdicts ('judge'), or one evaluation chunk
    ('eval'). `expires_at` (Unix seconds) is renewed while the holder lives; a lapsed claim may be
    taken over. `done` marks an item finished, never to be built again. `nodes.builder` records
    the holder that generated each node, so a takeover is visible after the fact.
    """
    db.execute(
        """
        CREATE TABLE claims (
            scope TEXT NOT NULL,
            run_id TEXT NOT NULL,
            item TEXT NOT NULL,
            holder TEXT NOT NULL,
            expires_at REAL NOT NULL,
            done INTEGER NOT NULL DEFAULT 0,
            claimed_at TEXT NOT NULL,
            PRIMARY KEY (scope, run_id, item)
        )"""
    )
    db.execute("CREATE INDEX claims_holder ON claims(holder, done)")
    db.execute("ALTER TABLE nodes ADD COLUMN builder TEXT")


@migrations()
def m005_skipped_questions(db: Database) -> None:
    """Questions a run gives no tree, and why (malt_local/run/too_long.py: `too_long` so far).

    A question whose longest prompt cannot fit the context with room to answer is recorded here
    before generation instead of being stored as empty nodes graded as answers. The numbers say
    what to change: `needed_tokens` (the refiner's prompt plus max_tokens for each of the three
    answers) against `limit_tokens` (the context one node may use). A later run that fits it
    deletes its row and builds the tree.
    """
    db.execute(
        """
        CREATE TABLE skipped_questions (
            run_id TEXT NOT NULL REFERENCES runs(id),
            question_id TEXT NOT NULL REFERENCES questions(id),
            reason TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            needed_tokens INTEGER NOT NULL,
            limit_tokens INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (run_id, question_id)
        )"""
    )


@migrations()
def m006_view_indexes(db: Database) -> None:
    """Indexes that answer `malt view`'s pages from the index alone at the paper's scale
    (7,500 questions x 39 nodes): no page reads every node's row.

    - `nodes_figures`: a run's per-role figures and histograms (value, length, finish reason,
      labels, accuracy, leaf reward) in one scan of the index, grouped in its own order.
    - `run_questions_position`: a page of a run's questions in run order (LIMIT/OFFSET).
    - `nodes_unvalued`: a run's nodes still without a value (a partial index, so it holds only
      the trees being built): how `malt view` sees that values were assigned since it looked.
    - three partial indexes, one per filter of the Questions page (a correct refiner leaf, a
      positive label, an output cut at max tokens): "does this question have one" is one
      look-up, so a filtered page never scans the trees of the questions it skips.
    """
    db.execute(
        "CREATE INDEX IF NOT EXISTS nodes_figures ON nodes(run_id, role, value, "
        "completion_tokens, finish_reason, label, correct, reward)"
    )
    db.execute(
        "CREATE INDEX IF NOT EXISTS run_questions_position ON run_questions(run_id, position)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS nodes_unvalued ON nodes(run_id) WHERE value IS NULL")
    db.execute(
        "CREATE INDEX IF NOT EXISTS nodes_solved ON nodes(run_id, question_id) "
        "WHERE depth = 3 AND reward = 1"
    )
    db.execute(
        "CREATE INDEX IF NOT EXISTS nodes_positive ON nodes(run_id, question_id) WHERE label = 1"
    )
    db.execute(
        "CREATE INDEX IF NOT EXISTS nodes_truncated ON nodes(run_id, question_id) "
        "WHERE finish_reason = 'length'"
    )


@migrations()
def m007_grade_reason(db: Database) -> None:
    """Why a node got its grade, for tasks that say ("passed", "timed out after 10 s").

    The code task runs each answer against its tests, in a pool beside generation
    (`malt_local.tasks.SlowGrading`): its nodes are stored first and graded when the program has
    run. `grade_reason` NULL on such a node means "not graded yet", which is how a resumed run
    finds the grading a killed one left undone. Other tasks grade while storing and leave it NULL.
    """
    db.execute("ALTER TABLE nodes ADD COLUMN grade_reason TEXT")
    db.execute("ALTER TABLE eval_generations ADD COLUMN grade_reason TEXT")
