-- The schema of malt's first release (migration m001_initial, commit 5e7e39b), frozen:
-- tests/test_versions.py builds a database with it and upgrades that database.
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
        );
CREATE TABLE questions (
            id TEXT PRIMARY KEY,
            task TEXT NOT NULL,
            question TEXT NOT NULL,
            ground_truth TEXT NOT NULL,
            options TEXT,
            source TEXT,
            metadata TEXT,
            created_at TEXT NOT NULL
        );
CREATE TABLE run_questions (
            run_id TEXT NOT NULL REFERENCES runs(id),
            question_id TEXT NOT NULL REFERENCES questions(id),
            position INTEGER NOT NULL,
            PRIMARY KEY (run_id, question_id)
        );
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
        );
CREATE INDEX nodes_run_question ON nodes(run_id, question_id);
CREATE INDEX nodes_parent ON nodes(parent_id);
CREATE INDEX nodes_run_role ON nodes(run_id, role);
