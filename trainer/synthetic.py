"""Generate Chinese instruction records in the instinwild/Alpaca layout from templates.

The tasks are regular enough that a tiny model fits them in a few dozen steps, which makes the
records useful for rehearsing a job and for tests. The same seed gives the same records.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

from trainer.report import report

CAPITALS = {
    "浙江省": "杭州",
    "江苏省": "南京",
    "广东省": "广州",
    "四川省": "成都",
    "湖北省": "武汉",
    "湖南省": "长沙",
    "山东省": "济南",
    "河南省": "郑州",
    "福建省": "福州",
    "陕西省": "西安",
}
ENGLISH = {
    "苹果": "apple",
    "水": "water",
    "书": "book",
    "猫": "cat",
    "狗": "dog",
    "太阳": "sun",
    "月亮": "moon",
    "朋友": "friend",
    "学校": "school",
    "老师": "teacher",
    "花": "flower",
    "鱼": "fish",
}
WORDS = ["春天", "天气", "学生", "音乐", "电脑", "中国", "大海", "山水", "朋友", "老师"]
OPERATIONS = {"加": lambda a, b: a + b, "减": lambda a, b: a - b, "乘": lambda a, b: a * b}
COUNT_WORDS = {2: "两", 3: "三", 4: "四"}

Record = dict[str, str]


def arithmetic(rng: random.Random) -> Record:
    name = rng.choice(list(OPERATIONS))
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    if name == "减" and b > a:
        a, b = b, a
    question = f"{a} {name} {b}"
    result = OPERATIONS[name](a, b)
    return {
        "instruction": f"计算 {question} 等于多少。",
        "input": "",
        "output": f"{question} 等于 {result}。",
    }


def capital(rng: random.Random) -> Record:
    province, city = rng.choice(list(CAPITALS.items()))
    return {"instruction": f"{province}的省会是哪里？", "input": "", "output": f"{province}的省会是{city}。"}


def translate(rng: random.Random) -> Record:
    word, english = rng.choice(list(ENGLISH.items()))
    return {"instruction": "把下面的词翻译成英文。", "input": word, "output": f"{word}的英文是 {english}。"}


def sort_numbers(rng: random.Random) -> Record:
    numbers = rng.sample(range(1, 50), rng.randint(3, 5))
    return {
        "instruction": "将下列数字从小到大排序。",
        "input": "，".join(map(str, numbers)),
        "output": "，".join(map(str, sorted(numbers))),
    }


def repeat(rng: random.Random) -> Record:
    word, times = rng.choice(WORDS), rng.choice(list(COUNT_WORDS))
    return {
        "instruction": f"把下面的词语重复{COUNT_WORDS[times]}遍。",
        "input": word,
        "output": "，".join([word] * times),
    }


def reverse(rng: random.Random) -> Record:
    text = "".join(rng.sample(WORDS, 2))
    return {"instruction": "把下面的文字倒过来写。", "input": text, "output": text[::-1]}


TASKS: tuple[Callable[[random.Random], Record], ...] = (
    arithmetic,
    capital,
    translate,
    sort_numbers,
    repeat,
    reverse,
)


def generate(count: int, seed: int) -> list[Record]:
    rng = random.Random(seed)
    records = []
    for i in range(count):
        record = rng.choice(TASKS)(rng)
        records.append({**record, "id": f"synthetic_{i}"})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write (an array)")
    parser.add_argument("--count", type=int, default=400, help="number of records (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")

    records = generate(args.count, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    with_input = sum(1 for r in records if r["input"])
    summary = {"out": str(args.out), "records": len(records), "with_input": with_input}
    return report(summary, args.json, f"wrote {len(records)} records ({with_input} with input) to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
