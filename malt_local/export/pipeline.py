"""`export()`: one export from database to folder, walking the trees once and writing every
requested file as it goes.

How: one read transaction (a consistent snapshot), the source runs' trees one at a time
(`trees.iter_trees`), and for each complete tree and role the records of `records` written by
the writers of `writer`, then the manifest (`manifest`) and the publish. Every error a user can
cause is raised before a file is written.

- **Provenance** (`provenance/<file>.jsonl`): line i names the node(s) behind line i of the
  data file, so training lines stay exactly in the trainers' schemas (`_write_tree`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from malt_local.db.store import JudgedNode, Store
from malt_local.diskspace import disk_guard
from malt_local.errors import MaltError
from malt_local.export.manifest import Stats, build_manifest, json_metadata, source_models
from malt_local.export.options import ExportOptions
from malt_local.export.pairing import (
    Dropped,
    Splitter,
    positives,
    score,
    tree_pairs,
)
from malt_local.export.records import dpo_record, json_example, sft_record
from malt_local.export.trees import RunInfo, Tree, complete_questions, iter_trees, source_runs
from malt_local.export.writer import (
    JsonDataset,
    RoleFiles,
    Writer,
    file_names,
    publish,
    temp_folder,
)


def export(db_path: Path, out: Path, options: ExportOptions) -> dict:
    """Write the datasets of `options` for the database at `db_path` into folder `out`.

    Returns the manifest. Every error a user can cause is raised (MaltError) before a file is
    written; if anything fails later, the temporary folder is removed and `out` is untouched.
    """
    options.validate()
    try:
        is_file = out.exists() and not out.is_dir()
    except OSError as exc:  # a name longer than the file system takes, a folder not readable
        raise MaltError(f"--out {str(out)!r} cannot be used: {exc.strerror}") from None
    if is_file:
        raise MaltError(f"output folder {out} is a file")
    if not db_path.exists():
        raise MaltError(f"no database at {db_path} (run `malt run` first, or pass --db)")
    store = Store(db_path, create=False)
    try:
        store.db.execute("BEGIN")  # one snapshot for the whole export
        try:
            runs = source_runs(store, options)
            splitter = None
            if options.valid_fraction is not None:
                splitter = Splitter.anchored(
                    options.valid_fraction,
                    (q for run in runs for q in complete_questions(store, run)),
                    options.roles,
                )
            try:
                tmp = temp_folder(out)
            except OSError as exc:  # not writable, or the name too long once prefixed
                raise MaltError(f"--out {str(out)!r} cannot be written: {exc.strerror}") from None
            try:
                with disk_guard(out):
                    manifest = _write_all(store, runs, options, splitter, tmp)
                    publish(tmp, out, manifest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            store.db.execute("ROLLBACK")
    finally:
        store.close()
    return manifest


def _write_all(
    store: Store,
    runs: list[RunInfo],
    options: ExportOptions,
    splitter: Splitter | None,
    tmp: Path,
) -> dict:
    names = {r: file_names(r, options.formats, splitter is not None) for r in options.roles}
    files: dict[str, RoleFiles] = {}
    for role, nm in names.items():
        rf = RoleFiles()
        if "sft" in nm:
            rf.sft, rf.sft_prov = Writer(tmp / nm["sft"]), Writer(tmp / nm["sft_prov"])
            if splitter is not None:
                for part in ("train", "valid"):
                    rf.split[part] = (Writer(tmp / nm[part]), Writer(tmp / nm[part + "_prov"]))
        if "dpo" in nm:
            rf.dpo, rf.dpo_prov = Writer(tmp / nm["dpo"]), Writer(tmp / nm["dpo_prov"])
        if "json" in nm:
            rf.seed_json = JsonDataset(tmp / nm["json"])
        files[role] = rf
    stats = Stats()
    dropped = {role: Dropped() for role in options.roles}
    per_run: dict[str, dict[str, int]] = {}
    judged_runs: set[str] = set()
    try:
        for run in runs:
            counts = per_run.setdefault(run.id, {"complete": 0, "incomplete": 0})
            for tree in iter_trees(store, run):
                if not tree.complete():
                    counts["incomplete"] += 1
                    continue
                counts["complete"] += 1
                for node in tree.nodes:
                    stats.latest = max(stats.latest, node.created_at, node.judged_at or "")
                    if node.judged:
                        judged_runs.add(run.id)
                for role in options.roles:
                    part = splitter.split(tree.question.id, role) if splitter else None
                    _write_tree(tree, role, files[role], options, part, dropped[role])
            started = store.db.execute(
                "SELECT COUNT(DISTINCT question_id) FROM nodes WHERE run_id = ?", [run.id]
            ).fetchone()[0]
            listed = store.db.execute(
                "SELECT COUNT(*) FROM run_questions WHERE run_id = ? AND question_id NOT IN "
                "(SELECT DISTINCT question_id FROM nodes WHERE run_id = ?)",
                [run.id, run.id],
            ).fetchone()[0]
            assert started == counts["complete"] + counts["incomplete"]
            counts["incomplete"] += listed  # questions of the run with no node yet
            stats.complete += counts["complete"]
            stats.incomplete += counts["incomplete"]
    finally:
        for rf in files.values():
            for w in rf.writers():
                w.close()
    if stats.complete == 0:
        raise MaltError(
            f"nothing to export: no complete trees in {store.path} ({stats.incomplete} "
            "questions incomplete; `malt run` finishes them)"
        )
    models = source_models(runs)
    counts: dict[str, dict[str, int]] = {}
    for role, rf in files.items():
        c: dict[str, int] = {}
        if rf.sft:
            c["sft"] = rf.sft.lines
            for part, (w, _) in rf.split.items():
                c[part] = w.lines
        if rf.dpo:
            c["dpo"] = rf.dpo.lines
        if rf.seed_json:
            meta = json_metadata(role, runs, models, stats, options, judged_runs)
            c["json"] = rf.seed_json.finish(meta)
        counts[role] = c
    manifest = build_manifest(
        runs, options, splitter, stats, per_run, models, counts, dropped, names, tmp
    )
    return manifest


def _write_tree(
    tree: Tree,
    role: str,
    rf: RoleFiles,
    options: ExportOptions,
    part: str | None,
    dropped: Dropped,
) -> None:
    for node in positives(
        tree.role_nodes(role), tree.run.theta, options.keep_length_stopped, dropped
    ):
        prov = _node_provenance(tree, node)
        if rf.sft and rf.sft_prov:
            record = sft_record(node)
            rf.sft.write_line(record)
            rf.sft_prov.write_line(prov)
            if part:
                data, prov_w = rf.split[part]
                data.write_line(record)
                prov_w.write_line(prov)
        if rf.seed_json:
            rf.seed_json.add(json_example(node, tree))
    if rf.dpo and rf.dpo_prov:
        pairs = tree_pairs(
            tree, role, options.max_pairs_per_group, options.keep_length_stopped, dropped
        )
        for chosen, rejected in pairs:
            rf.dpo.write_line(dpo_record(chosen, rejected))
            rf.dpo_prov.write_line(
                {
                    "run_id": tree.run.id,
                    "question_id": tree.question.id,
                    "parent_id": chosen.parent_id,
                    "chosen_id": chosen.id,
                    "rejected_id": rejected.id,
                    "chosen_score": score(chosen),
                    "rejected_score": score(rejected),
                }
            )


def _node_provenance(tree: Tree, node: JudgedNode) -> dict:
    return {
        "node_id": node.id,
        "run_id": tree.run.id,
        "question_id": tree.question.id,
        "parent_id": node.parent_id,
        "path": node.path,
        "score": score(node),
        "finish_reason": node.finish_reason,
    }
