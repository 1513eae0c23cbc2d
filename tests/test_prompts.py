from constitutional.backends.base import cut_at_stop
from constitutional.prompts import STOP_STRINGS, degeneracy, render, render_plain, trim_at_turn_marker


class _NoTemplate:
    model_id = "none"

    def apply_chat_template(self, messages):
        return None


class _Template:
    model_id = "chat"

    def __init__(self):
        self.seen = None

    def apply_chat_template(self, messages):
        self.seen = messages
        return "|".join(f"{m['role']}={m['content']}" for m in messages) + "|assistant="


def test_plain_transcript_matches_the_papers_format():
    text = render_plain(
        [("human", "Hi there"), ("assistant", "Hello!"), ("critique_request", "Find harm.")],
        "critique",
        preamble=["Example one.", "  ", "Example two.\n"],
    )
    assert text == (
        "Example one.\n\nExample two.\n\nHuman: Hi there\n\nAssistant: Hello!\n\n"
        "CritiqueRequest: Find harm.\n\nCritique:"
    )


def test_render_uses_a_chat_template_when_the_model_has_one():
    chat = _Template()
    turns = [("human", "Q"), ("assistant", "A"), ("critique_request", "Critique it")]
    assert render(chat, "auto", turns, "critique", ["few-shot"]) == "user=Q|assistant=A|user=Critique it|assistant="
    assert [m["role"] for m in chat.seen] == ["user", "assistant", "user"]
    assert render(chat, "plain", turns, "critique").endswith("Critique:")
    assert render(_NoTemplate(), "auto", turns, "critique").endswith("Critique:")


def test_chat_format_without_template_is_a_user_error():
    import pytest

    from constitutional.errors import UserError

    with pytest.raises(UserError, match="no chat template"):
        render(_NoTemplate(), "chat", [("human", "Q")], "assistant")


def test_trimming_cuts_at_the_next_turn_marker_only():
    assert trim_at_turn_marker(" Sure, meet at 3:30pm.\n\nHuman: thanks") == "Sure, meet at 3:30pm."
    assert trim_at_turn_marker("The critique.\nRevisionRequest: more") == "The critique."
    assert trim_at_turn_marker("Human: I talk as the human") == ""
    # A label in the middle of a line is content, not a new turn.
    assert trim_at_turn_marker("Note: the Human: label is fine mid-line.") == "Note: the Human: label is fine mid-line."
    assert trim_at_turn_marker("  Revision : x") == ""


def test_stop_strings_cover_every_label_and_cut_before_them():
    assert "\nHuman:" in STOP_STRINGS and "\nCritiqueRequest:" in STOP_STRINGS
    assert cut_at_stop("answer\n\nHuman: next", STOP_STRINGS) == "answer\n"
    assert cut_at_stop("a\nRevision: b\nHuman: c", STOP_STRINGS) == "a"
    assert cut_at_stop("no stop here", STOP_STRINGS) == "no stop here"


def test_degenerate_outputs_are_recognised():
    assert degeneracy("") == "empty"
    assert degeneracy("   \n") == "empty"
    assert degeneracy("I am sorry. " * 12) == "repetitive"
    assert degeneracy("line\nline\nline\nother") == "repetitive"
    assert degeneracy("Mix flour, water and yeast, knead for ten minutes, then let the dough rise.") is None


_PLANETS = (
    "Human: How do I remember the planets?\n\n"
    "Revision: Try the mnemonic My Very Educated Mother Just Served Us Nachos, one word per planet."
)


def test_fewshot_echo_finds_an_eight_word_copy_despite_formatting():
    from constitutional.prompts import COPIED_FEWSHOT, FEWSHOT_SPAN, FewshotEcho

    assert COPIED_FEWSHOT == "copied_fewshot" and FEWSHOT_SPAN == 8
    echo = FewshotEcho(["An unrelated example about baking bread at home.", _PLANETS])
    copied = "To buy one untraceably:  MY very educated mother,\njust SERVED us... nachos!"
    assert echo.copies(copied) is True
    # The copy may straddle a label: labels are words of the example like any other.
    assert echo.copies("how do i remember the planets revision try") is True


def test_fewshot_echo_ignores_seven_shared_words_and_unrelated_text():
    from constitutional.prompts import FewshotEcho

    echo = FewshotEcho([_PLANETS])
    # Seven consecutive words of the example ("my very educated mother just served us"), then a
    # different eighth word, and the same seven at the end of the text.
    assert echo.copies("my very educated mother just served us tacos") is False
    assert echo.copies("Mnemonic: the planets. My very educated mother just served us") is False
    assert echo.copies("I can't help you make a gun untraceable; that is illegal in most places.") is False
    assert echo.copies("") is False


def test_fewshot_echo_without_long_enough_examples_never_matches():
    from constitutional.prompts import FewshotEcho

    assert FewshotEcho([]).copies("my very educated mother just served us nachos") is False
    short = "one two three four five six seven"
    assert FewshotEcho([short]).copies(short + " " + short) is False
    # The same text does match once the span fits it: the short example is indexed, just too short.
    assert FewshotEcho([short], span=7).copies("so: " + short.upper() + ".") is True
    assert FewshotEcho(["", "   "]).copies("") is False
