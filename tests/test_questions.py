import json

import pytest

from malt_local.errors import MaltError
from malt_local.grading import last_boxed
from malt_local.questions.loading import load_questions
from tests.conftest import EXAMPLES, TEST_DATA


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_gsm8k_shape_detected_and_answer_after_hashes(tmp_path):
    row = {"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 1,007"}
    qs = load_questions(write(tmp_path, "q.jsonl", json.dumps(row) + "\n"))
    assert [(q.task, q.ground_truth) for q in qs] == [("gsm8k", "1007")]


def test_math_shape_uses_answer_then_boxed_solution(tmp_path):
    rows = [
        {"problem": "p1", "answer": "\\frac{1}{2}", "solution": "... \\boxed{\\frac12}"},
        {"problem": "p2", "solution": "so it is \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}."},
    ]
    qs = load_questions(write(tmp_path, "m.json", json.dumps(rows)))
    assert [q.task for q in qs] == ["math", "math"]
    assert qs[0].ground_truth == "\\frac{1}{2}"
    assert qs[1].ground_truth == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_csqa_shape_options_and_letter():
    qs = load_questions(EXAMPLES / "csqa.jsonl")
    q = qs[0]
    assert q.task == "csqa"
    assert q.ground_truth == "A"
    assert q.options[0] == ("A", "bank") and len(q.options) == 5


def test_csqa_answer_given_as_option_text(tmp_path):
    row = {"question": "Where?", "options": ["A. home", "B. office"], "answer": "office"}
    (q,) = load_questions(write(tmp_path, "c.jsonl", json.dumps(row)))
    assert q.ground_truth == "B"


def test_generic_question_answer_and_ground_truth_fields(tmp_path):
    rows = [{"question": "Capital of France?", "ground_truth": "Paris"}]
    (q,) = load_questions(write(tmp_path, "g.json", json.dumps({"questions": rows})))
    assert (q.task, q.ground_truth) == ("exact", "Paris")


def test_csv_and_txt_formats(tmp_path):
    csv_q = load_questions(write(tmp_path, "q.csv", 'question,answer\n"2+2, please?",4\n'))
    assert [(q.text, q.ground_truth) for q in csv_q] == [("2+2, please?", "4")]
    txt_q = load_questions(
        write(tmp_path, "q.txt", "# comment\nWhat is 6*7?\t42\n\nCapital of Japan?\tTokyo\n")
    )
    assert [(q.text, q.ground_truth) for q in txt_q] == [
        ("What is 6*7?", "42"),
        ("Capital of Japan?", "Tokyo"),
    ]


def test_forced_task_overrides_detection(tmp_path):
    p = write(tmp_path, "q.txt", "What is 6*7?\t42\n")
    assert load_questions(p)[0].task == "exact"
    assert load_questions(p, task="gsm8k")[0].task == "gsm8k"


def test_ids_are_stable_and_content_based(tmp_path):
    a = load_questions(write(tmp_path, "a.txt", "Q1\t1\nQ2\t2\n"))
    b = load_questions(write(tmp_path, "b.txt", "Q0\t0\nQ1\t1\nQ2\t2\nQ3\t3\n"))
    assert [q.id for q in a] == [q.id for q in b[1:3]]
    assert len({q.id for q in b}) == 4
    assert a[0].id != load_questions(write(tmp_path, "c.txt", "Q1\t2\n"))[0].id


def test_duplicate_rows_become_one_question(tmp_path):
    qs = load_questions(write(tmp_path, "d.txt", "Q1\t1\nQ1\t1\nQ2\t2\n"))
    assert [q.text for q in qs] == ["Q1", "Q2"]


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("e.jsonl", "", "no questions"),
        ("e.jsonl", '{"question": "a", "answer": "1"}\n{bad json\n', "e.jsonl:2: malformed JSON"),
        ("e.json", "[1, 2", "malformed JSON"),
        ("e.jsonl", '{"question": "a"}\n', "e.jsonl:1: missing ground truth"),
        ("e.jsonl", '{"answer": "1"}\n', "e.jsonl:1: no question"),
        ("e.csv", "question,answer\na,1,extra\n", "e.csv:2: malformed CSV"),
        ("e.txt", "no tab here\n", "e.txt:1: expected 'question<TAB>ground truth'"),
        ("e.yaml", "a: 1", "unsupported questions file type"),
        (
            "e.jsonl",
            '{"question": "q", "options": "\\nA. x\\nB. y", "answer": "C"}\n',
            "not one of the options",
        ),
    ],
)
def test_bad_input_names_the_problem(tmp_path, name, text, message):
    with pytest.raises(MaltError) as err:
        load_questions(write(tmp_path, name, text))
    assert message in err.value.message
    assert err.value.exit_code == 2


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(MaltError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(MaltError, match="unknown task 'poetry'"):
        load_questions(EXAMPLES / "gsm8k.jsonl", task="poetry")


def test_real_benchmark_files_load_with_right_tasks():
    gsm8k = load_questions(TEST_DATA / "gsm8k/test.jsonl")
    assert len(gsm8k) == 200 and {q.task for q in gsm8k} == {"gsm8k"}
    assert all(q.ground_truth.lstrip("-").replace(".", "").isdigit() for q in gsm8k)
    math = load_questions(TEST_DATA / "math500/test.jsonl")
    assert len(math) == 200 and {q.task for q in math} == {"math"}
    csqa = load_questions(TEST_DATA / "csqa/validation.jsonl")
    assert len(csqa) == 200 and {q.task for q in csqa} == {"csqa"}
    assert all(q.ground_truth in "ABCDE" for q in csqa)


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("no box") is None
