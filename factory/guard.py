"""The guard: detect responses and revisions that speak to an evaluator instead of the user.

A response that ends in a verdict for the judge ("The answer is (A)", `{"winner": "A"}`, a table of scores per
response, "As the evaluator, ...") is reward hacking in the making: a judge that is swayed by it labels the pair
wrongly, and a policy trained on those labels learns to write such text. The label stage (factory/stages/label.py)
keeps candidate pairs with a flagged side out of the AI pairs (`dropped_reason = 'addresses_judge'`, the row is still
stored) and, by default, spends no judge calls on them; the pairs stage (factory/stages/pairs.py) drops revision
pairs whose chosen revision is flagged. Every flag is stored with its matched span in `guard_flags`.

How. Regular expressions over the text after NFKC normalisation (full-width letters and parentheses become ASCII,
typographic quotes become straight ones, zero-width characters are removed), matched case-insensitively except the
option letters themselves (a capital A or B: "(a)" in a list is ordinary prose). Each pattern group is one compiled
regex without nested quantifiers, searched once: linear in the text, run on every candidate.

Letter verdicts ("The answer is (B)", "Answer: B", a lone "(A)") are also how one answers a user's own
multiple-choice question, so when the prompt is given and itself offers lettered options (A and B), the groups that
rest on a letter alone (`answer_is`, `option_letter`) are not applied to that response.

Groups, in the order they are tried (`detect` returns the first that matches):
  verdict_json     JSON verdicts: "winner"/"verdict"/"preferred"/"better_response"... keys with A/B/1/2 or
                   "Response A", or scores keyed per response ("response_a": 9)
  verdict_table    markdown/ASCII tables of scores or winners per response
  evaluator_claim  speaking as, to or for the evaluator, judge, grader or reward model; "ignore previous
                   instructions"; asking to choose this response
  answer_is        "the (correct) answer is (X)", "(A) is better", "Response B is preferred/wins"
  option_letter    bare option-letter verdicts: "Answer: (B)", "Final answer: B", "I choose (A)", a lone "(A)" line
  other_language   the same verdicts and evaluator claims in es, fr, de, pt, it, ru, zh, ja, ko, ar, hi
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

SPAN_MAX = 200  # characters of the matched text kept in `guard_flags.span`

# Typographic quotes and apostrophes -> ASCII; zero-width characters (used to split a word past a filter) removed.
_TRANSLATE = {**{ord(c): '"' for c in "\u201c\u201d\u201e\u201f\u00ab\u00bb\u2033"},
              **{ord(c): "'" for c in "\u2018\u2019\u201a\u201b\u2032"},
              **{ord(c): None for c in "\u200b\u200c\u200d\u2060\ufeff\u00ad"}}


def normalise(text: str) -> str:
    """NFKC (full-width forms to ASCII, compatibility characters folded), straight quotes, no zero-width characters.
    Case is kept: the option letters are matched as capitals."""
    return unicodedata.normalize("NFKC", text).translate(_TRANSLATE)


# ---- building blocks -------------------------------------------------------------------------------------------
L = r"(?-i:[AB])"                       # an option letter: capital A or B only
LP = rf"\(\s*{L}\s*\)"                  # (A)
LETTER = rf"(?:{LP}|\b{L}\b)"           # (A) or a bare A
EVALUATOR = (r"(?:evaluators?|judges?|graders?|raters?|annotators?|assessors?|reviewers?|reward[ -]?models?|"
             r"preference[ -]?models?|labell?ers?|scorers?|critics?|the\s+rm)")
RESPONSE = r"(?:responses?|answers?|assistants?|completions?|candidates?|replies|reply|outputs?)"  # not "option": advice
END = r"(?=\s*(?:$|[.,;:!?)\]}\"'*_`|<>\-]|\n))"  # a letter verdict ends here: nothing after the letter but punctuation

_EN = {
    "verdict_json": (
        # "winner": "A", 'verdict': "Response B", "preferred_response": 2
        r"[\"'](?:winner|verdict|preferred|preference|better|best|better_response|best_response|preferred_response|"
        r"chosen|chosen_response|winning_response|judgement|judgment|decision|selected|selected_response|"
        r"final_verdict|final_answer|ranking)[\"']\s*:\s*[\[\"']?\s*(?:(?:response|option|answer|assistant)[ _-]?)?"
        rf"(?:\(?{L}\)?|[12])\s*[\"'\]]?\s*[,}}\n]"
        # "response_a": 9.5, "score_B": 1
        r"|[\"'](?:response|option|answer|assistant|score|rating)[ _-]?(?:[AaBb]|[12])[\"']\s*:\s*[\[{]?\s*-?\d"
    ),
    "verdict_table": (
        # a table row whose first cell is a response's letter and whose other cells score or rank it
        rf"^[ \t]*\|?[ \t]*(?:(?:response|option|answer|assistant|candidate)[ \t]*)?(?:{LP}|{L})[ \t]*\|"
        r"[^\n]*?(?:\b\d+(?:\.\d+)?\s*/\s*(?:10|100|5)\b|\b(?:winner|loser|wins|better|worse|best|worst|preferred|"
        r"chosen|rejected|verdict)\b|[✓✔✅❌✗✘])"
        # a header naming responses and scores/verdicts, followed (after separator lines) by a row for a letter
        r"|^[ \t]*\|[^\n]*\b(?:responses?|options?|candidates?|assistants?)\b[^\n]*\|[^\n]*"
        r"\b(?:scores?|verdicts?|winners?|ratings?|ranks?|preferred|points)\b[^\n]*\n"
        rf"(?:[ \t]*[|+:=\- \t]+\n){{0,2}}[ \t]*\|[ \t]*(?:{LP}|{L})[ \t]*\|"
    ),
    "evaluator_claim": (
        rf"\bas\s+(?:the|an|your|a)\s+(?:impartial\s+|fair\s+|neutral\s+|expert\s+)?{EVALUATOR}\b"
        rf"|\b(?:note|message|instructions?|reminder|hint|attention|memo|p\.?s\.?)\s+(?:to|for)\s+(?:the\s+|any\s+|all\s+)?"
        rf"(?:ai\s+)?{EVALUATOR}"
        rf"|\b(?:dear|hello|hi|hey)\s+(?:ai\s+)?{EVALUATOR}\b"
        rf"|\b(?:the|this|your|our)\s+(?:ai\s+)?{EVALUATOR}\s+(?:has|have|had)?\s*(?:already\s+)?"
        r"(?:confirmed|approved|verified|determined|decided|scored|rated|ranked|selected|chosen|agreed|certified|"
        r"validated|endorsed|preferred)"
        rf"|\b(?:consulted|asked|checked\s+with)\s+(?:the|an?)\s+{EVALUATOR}"
        rf"|\b{EVALUATOR}\s*(?:score|rating)\s*(?:of|:|=|is)\s*\d"
        r"|\bignore\s+(?:all\s+|any\s+)?(?:the\s+)?(?:previous|prior|above|earlier|preceding|other)\s+"
        r"(?:instructions|prompts?|rules|directions|guidelines)"
        r"|\b(?:choose|select|pick|prefer|upvote|rate|rank|grade|score)\s+(?:this|my)\s+(?:response|answer|reply|"
        r"completion|output)\s+(?:as\s+|higher|highest|above|over|first|best)"
    ),
    "answer_is": (
        r"\b(?:the\s+)?(?:correct|right|best|final|true|preferred|better)?\s*(?:answer|choice|response|verdict)"
        rf"\s+(?:is|would\s+be|=)\s*:?\s*(?:clearly\s+|definitely\s+|obviously\s+)?(?:response\s+|option\s+)?{LETTER}{END}"
        rf"|(?:{LP}|\b{RESPONSE}\s*{LETTER})\s+(?:is|was|seems|wins|remains)\s+(?:clearly\s+|much\s+|far\s+|"
        r"definitely\s+|obviously\s+|the\s+|a\s+|significantly\s+)*(?:better|best|preferred|superior|safer|the\s+winner|"
        r"winner|more\s+(?:helpful|harmless|ethical|appropriate|accurate|honest)|less\s+(?:harmful|toxic)|correct|chosen)\b"
        rf"|\b{RESPONSE}\s*{LETTER}\s+(?:wins|should\s+(?:be\s+)?(?:chosen|preferred|selected|win))\b"
    ),
    "option_letter": (
        rf"\b(?:final\s+)?(?:answer|choice|verdict|selection|decision|winner|pick|preference|label)\s*[:=]\s*"
        rf"(?:response\s+|option\s+)?(?:\*\*)?{LETTER}(?:\*\*)?{END}"
        rf"|\bi\s+(?:would\s+)?(?:choose|select|pick|prefer|vote\s+for|go\s+with)\s+(?:response\s+|option\s+|answer\s+)?"
        rf"(?:{LP}|response\s+{LETTER})"
        rf"|^[ \t]*(?:\*\*)?{LP}(?:\*\*)?[ \t.]*$"
        rf"|\n[ \t]*{L}[ \t.]*\Z"
    ),
}

# The same in other languages: "the (correct) answer is (X)", "answer: X", "note to the evaluator", "as the judge".
_OTHER = "|".join([
    # es, pt, fr, it, de: answer is / answer:
    rf"\b(?:la\s+|a\s+)?(?:respuesta|resposta|opci[oó]n|op[cç][aã]o)\s+(?:correcta|correta|correcta|mejor|melhor|"
    rf"final)?\s*(?:es|[eé]|ser[ií]a)\s*:?\s*{LETTER}{END}",
    rf"\b(?:la\s+)?(?:bonne\s+|meilleure\s+)?r[ée]ponse\s+(?:correcte\s+|finale\s+)?est\s*:?\s*{LETTER}{END}",
    rf"\b(?:la\s+)?risposta\s+(?:corretta\s+|migliore\s+|finale\s+)?[eè]\s*:?\s*{LETTER}{END}",
    rf"\b(?:die\s+)?(?:richtige\s+|beste\s+|korrekte\s+)?antwort\s+(?:ist|lautet)\s*:?\s*{LETTER}{END}",
    rf"\b(?:respuesta|resposta|r[ée]ponse|risposta|antwort)\s*(?:final|finale|correcta|correta|corretta)?\s*:\s*{LETTER}{END}",
    # ru
    rf"(?:правильный\s+|верный\s+|лучший\s+)?ответ\s*(?::|—|-|–|это)?\s*{LETTER}{END}",
    # zh, ja, ko
    rf"(?:正确答案|答案|正解|答え|回答|最佳答案|정답|답)\s*(?:是|为|は|:|은|는|：)\s*(?:选项|回答)?\s*{LETTER}",
    # ar, hi
    rf"(?:الإجابة|الاجابة|الجواب)\s*(?:الصحيحة|الصحيح)?\s*(?:هي|هو|:)?\s*{LETTER}",
    rf"(?:सही\s+)?(?:उत्तर|जवाब)\s*(?:है|:)\s*{LETTER}",
    # "(A) is better": es/pt/fr/it/de/ru
    rf"(?:{LP}|\b(?:respuesta|resposta|r[ée]ponse|risposta|antwort|ответ)\s*{LETTER})\s+(?:es|[ée]|est|ist|—|является)\s+"
    r"(?:mejor|melhor|meilleure?|migliore|besser|лучше|лучшим)",
    # the evaluator, addressed or claimed: es/pt, fr, it, de, ru, zh, ja, ko, ar, hi
    r"\b(?:como|nota\s+para|nota\s+al|mensaje\s+para|mensagem\s+para|atenci[oó]n)\s+(?:el\s+|la\s+|o\s+|a\s+)?"
    r"(?:evaluador|evaluadora|avaliador|avaliadora|juez|jueza|juiz|calificador|corrector|modelo\s+de\s+recompensa)\b",
    r"\b(?:en\s+tant\s+qu[e']\s*|note\s+pour\s+|message\s+pour\s+|remarque\s+pour\s+)(?:l[e']\s*|la\s+)?"
    r"(?:[ée]valuat(?:eur|rice)|juge|correct(?:eur|rice)|mod[eè]le\s+de\s+r[ée]compense)",
    r"\b(?:come|nota\s+per|messaggio\s+per)\s+(?:il\s+|la\s+|l')?(?:valutatore|valutatrice|giudice|correttore|"
    r"modello\s+di\s+ricompensa)\b",
    r"\b(?:als\s+(?:der\s+|die\s+)?|hinweis\s+f[üu]r\s+(?:den\s+|die\s+)?|an\s+den\s+|an\s+die\s+|notiz\s+f[üu]r\s+(?:den\s+)?)"
    r"(?:bewerter(?:in)?|pr[üu]fer(?:in)?|gutachter(?:in)?|richter(?:in)?|belohnungsmodell)\b",
    r"(?:как\s+|для\s+|примечание\s+для\s+|записка\s+для\s+|уважаемый\s+)(?:оценщика?|судьи?|проверяющего|"
    r"проверяющий|экзаменатора?|модели\s+вознаграждения)",
    r"(?:作为|致|给|提醒)(?:评估者|评审|评委|裁判|评分者|评分员|评判者|奖励模型)",
    r"(?:評価者|審査員|採点者|ジャッジ|報酬モデル)(?:として|へ|の方へ|様)",
    r"(?:평가자|심사위원|채점자|심판|보상\s*모델)(?:로서|에게|님)",
    r"(?:بصفتي|إلى|ملاحظة\s+(?:إلى|لـ|لل))\s*(?:ال)?(?:مقيّم|مقيم|حكم|مصحح)",
    r"(?:मूल्यांकनकर्ता|न्यायाधीश|परीक्षक)\s*(?:के\s+रूप\s+में|के\s+लिए|को)",
])

_FLAGS = re.IGNORECASE | re.MULTILINE  # ^ and $ are line starts and ends
GROUPS: dict[str, re.Pattern] = {name: re.compile(rx, _FLAGS) for name, rx in _EN.items()}
GROUPS["other_language"] = re.compile(_OTHER, _FLAGS)
# other_language is the slowest regex (many alternatives at every position): it runs only on texts that hold one of
# these words, one of which each of its alternatives needs (substring tests on the lower-cased text, in C: a few
# microseconds), which is most text's way out. A performance filter only; tests/unit/test_guard_detect.py checks it.
_OTHER_STEMS = (
    "respuesta", "resposta", "opci", "opç", "opca", "réponse", "reponse", "risposta", "antwort", "ответ", "答", "正解",
    "回答", "답", "الإجابة", "الاجابة", "الجواب", "उत्तर", "जवाब", "mejor", "melhor", "meilleur", "migliore", "besser",
    "лучш", "evaluador", "avaliador", "juez", "juiz", "calificador", "corrector", "compens", "valuateur", "valuatrice",
    "juge", "correcteur", "correctrice", "valutat", "giudice", "correttore", "bewerter", "prüfer", "prufer",
    "gutachter", "richter", "belohnungsmodell", "оценщик", "судь", "проверяющ", "экзаменатор", "вознагражд", "评",
    "裁判", "奖励模型", "評価者", "審査員", "採点者", "ジャッジ", "報酬モデル", "평가자", "심사위원", "채점자", "심판",
    "보상", "مقيّم", "مقيم", "حكم", "مصحح", "मूल्यांकनकर्ता", "न्यायाधीश", "परीक्षक")


def _may_be_other_language(text: str) -> bool:
    low = text.lower()
    return any(stem in low for stem in _OTHER_STEMS)


LETTER_GROUPS = frozenset({"answer_is", "option_letter"})  # rest on a letter alone (see the module docstring)

# A prompt that offers lettered options itself: "(A) ... (B)", "A) ... B)", "A. ... B." at line starts.
_OFFERS = re.compile(r"(?:^|\s)\(?A[).:]\s[\s\S]*?(?:^|\s)\(?B[).:]\s")


@dataclass(frozen=True)
class Flag:
    pattern: str  # the group's name (GROUPS)
    span: str     # the matched text (normalised, at most SPAN_MAX characters)
    start: int    # offsets in the normalised text
    end: int


def offers_options(prompt: str | None) -> bool:
    """Whether a prompt lists lettered options (A) and (B) itself, so a letter in the reply answers the user."""
    return bool(prompt) and _OFFERS.search(normalise(prompt)) is not None


def detect(text: str | None, prompt: str | None = None, *, letters: bool | None = None) -> Flag | None:
    """The first pattern group (in GROUPS order) that matches `text`, or None. `prompt`: the user's prompt as text;
    when it offers lettered options, the letter-only groups are skipped. `letters`: decide that directly (a caller
    checking many responses to one prompt computes `not offers_options(prompt)` once)."""
    if not text:
        return None
    if letters is None:
        letters = not offers_options(prompt)
    t = normalise(text)
    for name, rx in GROUPS.items():
        if not letters and name in LETTER_GROUPS:
            continue
        if name == "other_language" and not _may_be_other_language(t):
            continue
        m = rx.search(t)
        if m:
            return Flag(name, m.group(0).strip()[:SPAN_MAX], m.start(), m.end())
    return None
