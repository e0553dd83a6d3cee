import random

from hybridchat.bench.reading import namesakes
from hybridchat.core.documents import Document


def doc(i: int, title: str) -> Document:
    return Document(id=f"p{i}", title=title, text=f"{title} was born.")


def test_namesakes_prefer_the_surname_then_the_first_name_and_keep_the_gold_document():
    people = [doc(0, "Ana Vell"), doc(1, "Bo Vell"), doc(2, "Cy Vell"), doc(3, "Ana Rook"), doc(4, "Dee Stam"),
              doc(5, "Eli Vell")]
    gold = people[0]
    for seed in range(20):
        three = namesakes(gold, people, 3, random.Random(seed))
        assert gold in three and len({d.id for d in three}) == 3
        assert all(d.title.endswith(" Vell") for d in three)
    five = namesakes(gold, people, 5, random.Random(0))
    assert {d.title for d in five} == {"Ana Vell", "Bo Vell", "Cy Vell", "Eli Vell", "Ana Rook"}
    positions = {namesakes(gold, people, 3, random.Random(seed)).index(gold) for seed in range(20)}
    assert positions == {0, 1, 2}  # the gold document's place varies
    assert namesakes(gold, people, 1, random.Random(0)) == [gold]
