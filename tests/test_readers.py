import csv
import json
from pathlib import Path

import pytest

from persona_align.data import READERS, read_dialogues
from persona_align.errors import InputError
from persona_align.records import Dialogue, read_records, write_records


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


PERSOBENCH_ROW = {
    "personas": "I keep bees in my garden.I have never seen the sea.I like Washington D.C.I am a nurse.",
    "context": "User1: Hello there!\nUser2: Hi, how are you?\nI was just out with my hives.\nUser1: What do you do?",
    "act_response": "User2: I work nights as a nurse, and I tend bees by day.",
}


def test_persobench_csv(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "prompts.csv", [PERSOBENCH_ROW, PERSOBENCH_ROW | {"act_response": ""}]
    )
    first, second = read_dialogues("persobench-csv", path)
    assert first.id == "prompts-00000" and second.id == "prompts-00001"
    assert first.persona == [
        "I keep bees in my garden.",
        "I have never seen the sea.",
        "I like Washington D.C.",
        "I am a nurse.",
    ]
    assert [(t.speaker, t.text) for t in first.context] == [
        ("User1", "Hello there!"),
        ("User2", "Hi, how are you?\nI was just out with my hives."),
        ("User1", "What do you do?"),
    ]
    assert first.reference == "I work nights as a nurse, and I tend bees by day."
    assert second.reference is None


def test_persobench_bare_query_is_a_user1_turn(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", [PERSOBENCH_ROW | {"context": "What is your job?"}])
    (dialogue,) = read_dialogues("persobench-csv", path)
    assert [(t.speaker, t.text) for t in dialogue.context] == [("User1", "What is your job?")]


FOCUS = {
    "data": [
        {
            "dialogID": "abc",
            "persona": ["I like castles.", "I am an architect.", "I live in Porto."],
            "knowledge": ["A long wiki paragraph.", "Another one."],
            "landmark_link": "https://example.org/castle",
            "utterance": [
                {
                    "dialogue1": [
                        "Where is this castle?",
                        "It is in Bragança, which you plan to visit.",
                    ],
                    "persona_candidate": [
                        "I like castles.",
                        "I am an architect.",
                        "I live in Porto.",
                    ],
                    "persona_grounding": [True, False, False],
                    "knowledge_candidates": ["k0", "The castle is in Bragança."],
                    "knowledge_answer_index": 1,
                },
                {
                    "dialogue2": [
                        "Where is this castle?",
                        "It is in Bragança, which you plan to visit.",
                        "Who built it?",
                        "King Sancho built it; as an architect you will like its walls.",
                    ],
                    "persona_candidate": [
                        "I like castles.",
                        "I am an architect.",
                        "I live in Porto.",
                    ],
                    "persona_grounding": [False, True, False],
                    "knowledge_candidates": ["It was built by King Sancho.", "k1"],
                    "knowledge_answer_index": 0,
                },
            ],
        }
    ]
}


def test_focus_json(tmp_path: Path) -> None:
    path = tmp_path / "focus.json"
    path.write_text(json.dumps(FOCUS), encoding="utf-8")
    first, second = read_dialogues("focus-json", path)
    assert (first.id, second.id) == ("abc-1", "abc-2")
    assert [t.speaker for t in first.context] == ["User1"]
    assert first.reference == "It is in Bragança, which you plan to visit."
    assert first.persona_grounding == [True, False, False]
    assert first.knowledge == ["The castle is in Bragança."]
    assert [t.speaker for t in second.context] == ["User1", "User2", "User1"]
    assert second.context[-1].text == "Who built it?"
    assert second.reference.startswith("King Sancho")
    assert second.persona_grounding == [False, True, False]
    assert second.meta["knowledge_answer_index"] == 0 and second.meta["dialog_id"] == "abc"


PERSONACHAT = """1 your persona: i love to paint.
2 your persona: my dog is named bo.
3 partner's persona: i am a chef.
4 hi , how are you ?\tgreat , just finished a painting .\t\tno thanks .|great , just finished a painting .
5 what did you paint ?\tmy dog bo , sleeping on the couch .\t\tyes|my dog bo , sleeping on the couch .
1 your persona: i am a pilot.
2 __SILENCE__\thello , i just landed .\t\ta|b
3 welcome back !\tthanks , it was a long flight .\t\tc|d
"""


def test_personachat(tmp_path: Path) -> None:
    path = tmp_path / "train_both_original.txt"
    path.write_text(PERSONACHAT, encoding="utf-8")
    dialogues = read_dialogues("personachat", path)
    assert [d.id for d in dialogues] == [
        "train_both_original-00000-04",
        "train_both_original-00000-05",
        "train_both_original-00001-03",
    ]
    first, second, third = dialogues
    assert first.persona == ["i love to paint.", "my dog is named bo."]
    assert first.meta["partner_persona"] == ["i am a chef."]
    assert "candidates" not in first.meta
    assert [(t.speaker, t.text) for t in second.context] == [
        ("User1", "hi , how are you ?"),
        ("User2", "great , just finished a painting ."),
        ("User1", "what did you paint ?"),
    ]
    assert second.reference == "my dog bo , sleeping on the couch ."
    # the bot's opening after __SILENCE__ has no context to answer, so it only becomes history
    assert [(t.speaker, t.text) for t in third.context] == [
        ("User2", "hello , i just landed ."),
        ("User1", "welcome back !"),
    ]
    with_candidates = read_dialogues("personachat", path, keep_candidates="true")
    assert with_candidates[0].meta["candidates"] == [
        "no thanks .",
        "great , just finished a painting .",
    ]


BAIDU_BOTH = {
    "bot_persona": ["B1: 我 喜欢 做饭 ， 但是 不 爱 刷 碗", "B2: 我 25 岁"],
    "user_said_persona": ["U1: 我 在 图书馆 打工"],
    "user_no_said_persona": ["U2: 我 在 上 大学"],
    "conversation": [
        "Usr: 我 的 大学 生活 真 是 太 轻松 了 。",
        "Bot: 嗯嗯 ， 你 还在 图书馆 里 打工 呢 。\tU1",
        "Usr: 你 平时 做 什么 ？",
        "Bot：我 喜欢 做饭 ， 就是 不 爱 刷 碗 。\tB1",
    ],
}
BAIDU_SELF = {
    "p1_persona": ["U1: 我 是 老师"],
    "p2_persona": ["U1: 我 养 了 一 只 猫", "U2: 我 住 在 北京"],
    "conversation": [
        "p1: 你好 ！",
        "p2: 你好 ， 我 刚 喂 完 猫 。\tU1",
        "p1: 我 是 老师 ， 你 呢 ？\tU1",
    ],
}


def test_baidu_personachat_both_and_self_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "dulemon.json"
    lines = [json.dumps(BAIDU_BOTH, ensure_ascii=False), json.dumps(BAIDU_SELF, ensure_ascii=False)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dialogues = read_dialogues("baidu-personachat", path)
    both1, both2, self1, self2 = dialogues
    assert both1.persona == ["我 喜欢 做饭 ， 但是 不 爱 刷 碗", "我 25 岁"]
    assert both1.context[0].text == "我 的 大学 生活 真 是 太 轻松 了 。"
    assert both1.reference == "嗯嗯 ， 你 还在 图书馆 里 打工 呢 。"
    assert both1.persona_grounding == [False, False] and both1.meta["grounding_ids"] == ["U1"]
    assert both1.meta["user_persona"] == ["我 在 图书馆 打工"]
    assert both2.reference == "我 喜欢 做饭 ， 就是 不 爱 刷 碗 。"  # full-width colon prefix
    assert both2.persona_grounding == [True, False]
    assert [t.speaker for t in both2.context] == ["User1", "User2", "User1"]
    assert self1.persona == ["我 养 了 一 只 猫", "我 住 在 北京"] and self1.persona_grounding == [
        True,
        False,
    ]
    assert self2.persona == ["我 是 老师"] and [t.speaker for t in self2.context] == [
        "User2",
        "User1",
    ]
    # Chinese text survives a write and a read byte for byte
    out = tmp_path / "out.jsonl"
    write_records(out, dialogues, Dialogue)
    assert read_records(out, Dialogue) == dialogues
    assert "图书馆" in out.read_text(encoding="utf-8")


def test_jsonl_reader_and_registry(tmp_path: Path) -> None:
    assert {"persobench-csv", "focus-json", "personachat", "baidu-personachat", "jsonl"} <= set(
        READERS
    )
    dialogue = Dialogue(id="x", persona=["I sing."], context=[{"speaker": "User1", "text": "Hi"}])
    path = tmp_path / "d.jsonl"
    write_records(path, [dialogue], Dialogue)
    assert read_dialogues("jsonl", path) == [dialogue]
    with pytest.raises(InputError, match="unknown format 'nope'"):
        read_dialogues("nope", path)
    with pytest.raises(InputError, match="has no option 'bogus'"):
        read_dialogues("jsonl", path, bogus="1")


def test_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    dialogue = Dialogue(id="x", persona=["I sing."], context=[{"speaker": "User1", "text": "Hi"}])
    path = tmp_path / "d.jsonl"
    write_records(path, [dialogue, dialogue], Dialogue)
    with pytest.raises(InputError, match="duplicate dialogue id 'x'"):
        read_dialogues("jsonl", path)
