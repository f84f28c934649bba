import pytest

from cervl.core.labels import (CEXPR, COMPOUND, LABEL_SETS, components, get_label_set, label_set_containing,
                          resolve_name)


def test_rafdb_basic_ids_match_dataset_convention():
    s = get_label_set("rafdb-basic")
    assert s.id_to_name == {1: "Surprise", 2: "Fear", 3: "Disgust", 4: "Happiness", 5: "Sadness", 6: "Anger",
                            7: "Neutral"}


def test_affwild2_and_cexprdb_ids():
    aw = get_label_set("affwild2-expr")
    assert aw.id_to_name[0] == "Neutral" and aw.id_to_name[7] == "Other" and aw.unannotated_id == -1
    c = get_label_set("cexprdb")
    assert c.classes == CEXPR and c.ids == tuple(range(7))
    assert c.name_to_id["Sadly Angry"] == 6 and c.name_to_id["Fearfully Surprised"] == 0


@pytest.mark.parametrize("name", sorted(LABEL_SETS))
def test_label_set_round_trip(name):
    s = get_label_set(name)
    assert len(set(s.classes)) == len(s.classes)
    for i in s.ids:
        assert s.name_to_id[s.id_to_name[i]] == i
    for pos, c in enumerate(s.classes):
        assert s.index_of[c] == pos and s.resolve(c.upper().replace(" ", "_")) == c


@pytest.mark.parametrize("text", ["happily-surprised", "Happily_Surprised", "  HAPPILY   surprised ",
                                  "happily__surprised"])
def test_tolerant_matching(text):
    assert resolve_name(text) == "Happily Surprised"


def test_components_of_every_compound_class():
    assert components("Happily Surprised") == ("Happiness", "Surprise")
    assert components("Disgustedly Surprised") == ("Disgust", "Surprise")
    assert components("Fearfully Angry") == ("Fear", "Anger")
    assert len(COMPOUND) == 11
    for c in COMPOUND:
        a, b = components(c)
        assert a != b
    with pytest.raises(ValueError):
        components("Happiness")


def test_unknown_names_give_suggestions():
    with pytest.raises(KeyError, match="did you mean 'rafdb-basic'"):
        get_label_set("rafdb-basci")
    with pytest.raises(KeyError, match="not a class of label set"):
        get_label_set("cexprdb").resolve("Happily Disgusted")
    with pytest.raises(KeyError, match="unknown label id 9"):
        get_label_set("rafdb-basic").name_for_id(9)
    assert get_label_set("RAFDB_Compound").name == "rafdb-compound"


def test_label_set_containing_picks_smallest():
    assert label_set_containing({"Sadly Angry", "Happily Surprised"}).name == "cexprdb"
    assert label_set_containing({"Happily Disgusted"}).name == "rafdb-compound"
