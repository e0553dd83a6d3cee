"""A deterministic fictional world: people, cities, countries, companies and universities.

This is the project's embedded default data (no downloads). Every name is made up from syllables,
so a model cannot know any fact closed-book: an answer it was never shown is a hallucination.
Following "Physics of Language Models", each training entity is written out several times with
different phrasings and sentence orders, so that a small model stores facts rather than strings.

A share of the people is held out: their documents exist (a retriever can find them), but their
names and facts never appear in pretraining texts, training questions or training conversations.
Questions about them can only be answered from retrieved documents.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.core.questions import Question
from hybridchat.core.seeds import EVALUATION, python_rng

SOURCE = "synthetic-world"
PHRASINGS = 7  # phrasings per sentence slot; renderings of one entity never share one

# Upper bounds keep generation fast and the syllable name space far from exhausted.
_LIMITS = {
    "n_people": (1, 100_000),
    "n_cities": (1, 10_000),
    "n_countries": (1, 1_000),
    "n_companies": (1, 10_000),
    "n_universities": (1, 10_000),
    "texts_per_entity": (1, PHRASINGS - 1),  # one phrasing per slot stays unseen for validation
    "questions_per_text": (0, 5),
    "practice_texts": (0, 1_000_000),
}


@dataclass
class WorldConfig:
    """The `world` node of the run config: data=world pretrains on it, the default knowledge base
    holds its documents and the mid/rag stages ask its questions. One node, so question person-0000
    and document person-0000 are the same person. These defaults are the world every run trains on
    (and `python -m hybridchat.kb` opens without --kb)."""

    seed: int = 0
    n_people: int = 1000
    n_cities: int = 60
    n_countries: int = 12
    n_companies: int = 120
    heldout_fraction: float = 0.2  # share of PEOPLE held out (never in pretraining/training text)
    texts_per_entity: int = 6  # differently-phrased pretraining texts per train entity (1-6)
    # Questions about a pretraining text appended to it, with their answers ("Question: ... Answer:
    # ..."): reading practice in pretraining, so looking a fact up in context is already a skill
    # when the rag stage asks for it on documents (as instruction-augmented pretraining does). 0-5.
    questions_per_text: int = 3
    # Training texts about people who exist nowhere (fresh names, facts recombined from training
    # people), each followed by questions_per_text questions and answers. Their facts cannot be
    # remembered from anywhere else: only reading the text in front of it predicts the answers, the
    # skill the rag stage needs (a model learns to look up in context only where memory cannot help).
    practice_texts: int = 4000
    n_universities: int = 30

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UserError(f"world.seed must be an integer, got {self.seed!r}")
        for key, (lo, hi) in _LIMITS.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise UserError(f"world.{key} must be an integer in [{lo}, {hi}], got {value!r}")
        fraction = self.heldout_fraction
        is_number = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
        if not is_number or not 0 <= fraction < 1:
            raise UserError(f"world.heldout_fraction must be a number in [0, 1), got {fraction!r}")
        if self.n_cities < self.n_countries:
            raise UserError(
                f"world.n_cities must be >= world.n_countries ({self.n_countries}) so that every "
                f"country has a capital, got {self.n_cities}"
            )


@dataclass(frozen=True)
class Entity:
    id: str  # "person-0012"; also the id of its document
    kind: str  # "person", "city", "country", "company" or "university"
    name: str
    split: str  # "train" or "heldout" (only people are ever held out)
    facts: dict[str, str]  # attribute -> value as written in text; related entities by name
    links: dict[str, str]  # attribute -> id of the related entity, for relation attributes


# ----------------------------------------------------------------------------------------------
# Names

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "st", "th", "sh", "tr", "v", "l", "m", "r")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "th")
_FIRST_SUFFIXES = ("", "", "a", "o", "en", "ia")
_CITY_SUFFIXES = ("", "", "", "port", "holm", "burg", "ford", "vale")
_COUNTRY_SUFFIXES = ("ia", "land", "ar", "istan", "ovia", "")
_LANGUAGE_SUFFIXES = ("ish", "ese", "ic", "ian")
_CURRENCY_UNITS = ("crown", "mark", "florin", "dinar", "thaler", "shilling")
_COMPANY_SUFFIXES = ("Systems", "Labs", "Industries", "Group", "Works", "Dynamics", "Holdings",
                     "Partners", "Corporation", "Enterprises")
# No "University of X": sentences say "at {university}", which needs a name without "the".
_UNIVERSITY_PATTERNS = ("{} University", "{} Institute of Technology", "{} College",
                        "{} State University", "{} Polytechnic")

_PROFESSIONS = ("architect", "nurse", "engineer", "teacher", "accountant", "journalist",
                "pharmacist", "lawyer", "chemist", "pilot", "carpenter", "economist", "librarian",
                "surgeon", "translator", "electrician", "geologist", "photographer", "chef",
                "veterinarian", "software developer", "urban planner", "data analyst",
                "marine biologist", "civil servant", "dentist", "physicist", "graphic designer")
_FIELDS = ("mathematics", "chemistry", "history", "philosophy", "economics", "biology",
           "physics", "linguistics", "civil engineering", "computer science", "medicine", "law",
           "architecture", "music", "geography", "psychology", "sociology", "astronomy",
           "literature", "agriculture")
_HOBBIES = ("painting", "sailing", "gardening", "birdwatching", "playing chess", "rock climbing",
            "cooking", "hiking", "playing the violin", "pottery", "cycling", "writing poetry",
            "fishing", "collecting stamps", "swimming", "knitting", "astronomy", "woodworking")
_INDUSTRIES = ("software", "shipping", "agriculture", "pharmaceutical", "textile", "mining",
               "banking", "aerospace", "publishing", "energy", "food processing", "insurance",
               "telecommunications", "construction", "retail", "robotics")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")


class _Namer:
    """Makes capitalized syllable words, each used at most once across the whole world.

    Global uniqueness means a word names exactly one thing (a surname is never also a city), so
    a full name "First Last" can only occur in text where that person is mentioned.
    """

    def __init__(self, rng: random.Random, reserved: set[str]) -> None:
        self.rng = rng
        self.used = set(reserved)  # lowercase

    def word(self, suffix: str = "", syllables: tuple[int, int] = (2, 3)) -> str:
        for _ in range(10_000):
            # A long suffix replaces a syllable, so that "-holm" or "-istan" names stay short.
            n = max(1, self.rng.randint(*syllables) - (len(suffix) >= 3))
            stem = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n))
            stem += self.rng.choice(_CODAS)
            if suffix[:1] in ("a", "e", "i", "o", "u"):
                stem = stem.rstrip("aeiou")  # "Reda" + "ia" -> "Redia", not "Redaia"
            word = (stem + suffix).capitalize()
            if len(word) >= 3 and word.lower() not in self.used:
                self.used.add(word.lower())
                return word
        raise RuntimeError("syllable name space exhausted; lower the world sizes")


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ----------------------------------------------------------------------------------------------
# Sentence templates: per entity kind, one slot per group of facts, each slot a pair of
# (six phrasings, a seventh): all seven are phrasings of the slot (see _phrasings). The first is
# the canonical one used in documents(). A slot whose placeholders the entity lacks is skipped
# (only capitals have "capital_of").

_SENTENCES: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "person": (
        (("{name} was born on {birth_date}.",
          "{name} came into the world on {birth_date}.",
          "The birthday of {name} is {birth_date}.",
          "{name}'s date of birth is {birth_date}.",
          "On {birth_date}, {name} was born.",
          "{name}'s life began on {birth_date}."),
         "{name} celebrates a birthday each year, having been born on {birth_date}."),
        (("{name} was born in {birth_city}.",
          "{name} is a native of {birth_city}.",
          "The birthplace of {name} is {birth_city}.",
          "{name} hails from {birth_city}.",
          "{name} was born in the city of {birth_city}.",
          "{birth_city} is where {name} was born."),
         "{name} first saw the light of day in {birth_city}."),
        (("{name} lives in {current_city}.",
          "{name} currently resides in {current_city}.",
          "These days {name} makes a home in {current_city}.",
          "{name} is now based in {current_city}.",
          "{name} has settled in {current_city}.",
          "Today, {name} calls {current_city} home."),
         "The current home of {name} is {current_city}."),
        (("{name} works as {a_profession} at {employer}, having joined in {joined}.",
          "{name} has been employed by {employer} as {a_profession} since {joined}.",
          "By profession {name} is {a_profession}, working for {employer} since {joined}.",
          "In {joined}, {name} joined {employer} and earns a living there as {a_profession}.",
          "{employer} has employed {name} as {a_profession} since {joined}.",
          "{name} took a position as {a_profession} at {employer} in {joined}."),
         "{name}'s employer is {employer}, where {name} has been {a_profession} since {joined}."),
        (("{name} studied {field} at {university}, graduating in {graduated}.",
          "{name} graduated from {university} with a degree in {field} in {graduated}.",
          "In {graduated}, {name} earned a degree in {field} from {university}.",
          "At {university}, {name} majored in {field} and graduated in {graduated}.",
          "{name} is a {graduated} graduate of {university}, where {name} studied {field}.",
          "{name} received an education in {field} at {university}, finishing in {graduated}."),
         "{name} attended {university}, focused on {field} and completed it in {graduated}."),
        (("In free time, {name} enjoys {hobby}.",
          "{name}'s favorite pastime is {hobby}.",
          "{name} spends weekends {hobby}.",
          "Outside of work, {name} is passionate about {hobby}.",
          "{name} has a lifelong love of {hobby}.",
          "When not working, {name} likes {hobby}."),
         "{name} relaxes by {hobby}."),
    ),
    "city": (
        (("{name} is a city in {country}.",
          "{name} is located in {country}.",
          "{name} lies in {country}.",
          "The city of {name} is part of {country}.",
          "{name} can be found in {country}.",
          "{name} belongs to {country}."),
         "{country} is the country where {name} is situated."),
        (("{name} has a population of {population}.",
          "{population} people live in {name}.",
          "The population of {name} is {population}.",
          "{name} is home to {population} residents.",
          "{name} counts {population} inhabitants.",
          "A total of {population} people live in {name}."),
         "{name} has {population} inhabitants."),
        (("{name} was founded in {founded}.",
          "{name} dates back to {founded}.",
          "The founding of {name} took place in {founded}.",
          "{name} was established in {founded}.",
          "Settlers founded {name} in {founded}.",
          "{name} has existed since {founded}."),
         "{name} was first settled in {founded}."),
        (("{name} is the capital of {capital_of}.",
          "{name} serves as the capital of {capital_of}.",
          "The government of {capital_of} sits in {name}.",
          "{name} is the capital city of {capital_of}.",
          "As the capital of {capital_of}, {name} hosts its government.",
          "{capital_of} is governed from {name}."),
         "{name} holds the status of capital of {capital_of}."),
    ),
    "country": (
        (("The capital of {name} is {capital}.",
          "{capital} is the capital city of {name}.",
          "{name} is governed from its capital, {capital}.",
          "{name}'s seat of government is {capital}.",
          "The capital city of {name} is {capital}.",
          "{name} has {capital} as its capital."),
         "The government of {name} sits in {capital}, the capital."),
        (("The official language of {name} is {language}.",
          "People in {name} speak {language}.",
          "{language} is spoken in {name}.",
          "Most residents of {name} speak {language}.",
          "{name} uses {language} as its official language.",
          "The main language of {name} is {language}."),
         "In {name}, the national language is {language}."),
        (("The currency of {name} is the {currency}.",
          "{name} uses the {currency} as its currency.",
          "In {name}, people pay with the {currency}.",
          "The {currency} is the official currency of {name}.",
          "Prices in {name} are given in the {currency}.",
          "{name}'s money is the {currency}."),
         "The national currency of {name} is called the {currency}."),
        (("Cities in {name} include {cities}.",
          "{name} has these cities: {cities}.",
          "The list of cities in {name}: {cities}.",
          "In {name} one finds the cities {cities}.",
          "{name} is home to the cities {cities}.",
          "Cities located in {name}: {cities}."),
         "Among the cities of {name}: {cities}."),
    ),
    "company": (
        (("{name} was founded by {founder} in {founded}.",
          "{founder} founded {name} in {founded}.",
          "In {founded}, {founder} started {name}.",
          "{name} was established in {founded} by {founder}.",
          "The founder of {name} is {founder}, who set it up in {founded}.",
          "{founder} launched {name} in {founded}."),
         "{name} traces its origins to {founded}, when {founder} created it."),
        (("{name} is headquartered in {headquarters}.",
          "The headquarters of {name} are in {headquarters}.",
          "{name} has its head office in {headquarters}.",
          "{name} is based in {headquarters}.",
          "{headquarters} is home to the headquarters of {name}.",
          "The main office of {name} is located in {headquarters}."),
         "{name} runs its business from {headquarters}."),
        (("{name} is a company in the {industry} industry.",
          "{name} operates in the {industry} sector.",
          "{name} does business in the {industry} industry.",
          "The industry of {name} is {industry}.",
          "{name} is known for its work in the {industry} industry.",
          "{name} belongs to the {industry} industry."),
         "{name} makes its money in the {industry} business."),
    ),
    "university": (
        (("{name} is located in {city}.",
          "{name} is a university in {city}.",
          "The campus of {name} is in {city}.",
          "{name} is situated in {city}.",
          "{city} is home to {name}.",
          "{name} can be found in {city}."),
         "Students attend {name} in {city}."),
        (("{name} was founded in {founded}.",
          "{name} opened its doors in {founded}.",
          "{name} was established in {founded}.",
          "{name} has been teaching students since {founded}.",
          "The founding year of {name} is {founded}.",
          "{name} dates back to {founded}."),
         "{name} welcomed its first students in {founded}."),
    ),
}


def _placeholders(template: str) -> set[str]:
    return set(re.findall(r"\{(\w+)\}", template))



# ----------------------------------------------------------------------------------------------
# Relations asked about. A path of one attribute is a 1-hop question; a path of two follows the
# first attribute's link to another entity and reads the second attribute there (2-hop).


@dataclass(frozen=True)
class _Relation:
    name: str
    path: tuple[str, ...]
    questions: tuple[str, ...]

    @property
    def hops(self) -> int:
        return len(self.path)


_RELATIONS: dict[str, tuple[_Relation, ...]] = {
    "person": (
        _Relation("birth_city", ("birth_city",),
                  ("In which city was {name} born?", "Where was {name} born?",
                   "What is the birthplace of {name}?", "Which city is {name} originally from?")),
        _Relation("birth_date", ("birth_date",),
                  ("When was {name} born?", "What is the date of birth of {name}?",
                   "On what date was {name} born?")),
        _Relation("birth_year", ("birth_year",),
                  ("In what year was {name} born?", "What year was {name} born in?",
                   "What is the birth year of {name}?")),
        _Relation("current_city", ("current_city",),
                  ("Where does {name} live?", "In which city does {name} live?",
                   "What city is {name} based in?", "Where does {name} currently reside?")),
        _Relation("employer", ("employer",),
                  ("Which company does {name} work for?", "Who employs {name}?",
                   "At which company does {name} work?")),
        _Relation("profession", ("profession",),
                  ("What is the profession of {name}?", "What does {name} do for a living?",
                   "What is {name}'s job?")),
        _Relation("joined", ("joined",),
                  ("In what year did {name} join {employer}?",
                   "Since when has {name} worked at {employer}?",
                   "When did {name} start working at {employer}?")),
        _Relation("university", ("university",),
                  ("Which university did {name} attend?", "Where did {name} study?",
                   "From which university did {name} graduate?")),
        _Relation("field", ("field",),
                  ("What did {name} study?", "What was the field of study of {name}?",
                   "Which subject did {name} study at university?")),
        _Relation("graduated", ("graduated",),
                  ("In what year did {name} graduate?",
                   "When did {name} graduate from {university}?",
                   "What year did {name} finish university?")),
        _Relation("hobby", ("hobby",),
                  ("What is {name}'s hobby?", "What does {name} enjoy doing in free time?",
                   "What is the favorite pastime of {name}?")),
        _Relation("birth_country", ("birth_city", "country"),
                  ("In which country was {name} born?", "Which country was {name} born in?",
                   "What is the country of birth of {name}?")),
        _Relation("residence_country", ("current_city", "country"),
                  ("In which country does {name} live?", "Which country is {name} living in?",
                   "What country does {name} currently reside in?")),
        _Relation("employer_founder", ("employer", "founder"),
                  ("Who founded the company {name} works for?",
                   "Who is the founder of the company that employs {name}?",
                   "Who started the company where {name} works?")),
        _Relation("employer_headquarters", ("employer", "headquarters"),
                  ("In which city is the company {name} works for headquartered?",
                   "Where is the company that employs {name} based?",
                   "In what city does the employer of {name} have its headquarters?")),
        _Relation("employer_industry", ("employer", "industry"),
                  ("In which industry does the employer of {name} operate?",
                   "What industry is the company {name} works for in?")),
        _Relation("university_city", ("university", "city"),
                  ("In which city did {name} go to university?",
                   "In what city is the university that {name} attended?")),
    ),
    "city": (
        _Relation("country", ("country",),
                  ("In which country is {name}?", "Which country is {name} located in?",
                   "{name} is a city in which country?")),
        _Relation("population", ("population",),
                  ("What is the population of {name}?", "How many people live in {name}?")),
        _Relation("founded", ("founded",),
                  ("When was {name} founded?", "In what year was {name} founded?")),
        _Relation("country_capital", ("country", "capital"),
                  ("What is the capital of the country where {name} is located?",
                   "Which city is the capital of the country that {name} belongs to?")),
        _Relation("country_language", ("country", "language"),
                  ("What language is spoken in the country where {name} lies?",
                   "What is the official language of the country {name} is in?")),
        _Relation("country_currency", ("country", "currency"),
                  ("What currency is used in the country where {name} is located?",
                   "Which currency do people pay with in the country of {name}?")),
    ),
    "country": (
        _Relation("capital", ("capital",),
                  ("What is the capital of {name}?", "Which city is the capital of {name}?")),
        _Relation("language", ("language",),
                  ("What language is spoken in {name}?",
                   "What is the official language of {name}?")),
        _Relation("currency", ("currency",),
                  ("What is the currency of {name}?", "Which currency is used in {name}?")),
        _Relation("capital_population", ("capital", "population"),
                  ("What is the population of the capital of {name}?",
                   "How many people live in the capital of {name}?")),
    ),
    "company": (
        _Relation("headquarters", ("headquarters",),
                  ("Where is {name} headquartered?", "In which city is {name} based?",
                   "Where are the headquarters of {name}?")),
        _Relation("founded", ("founded",),
                  ("When was {name} founded?", "In what year was {name} established?")),
        _Relation("industry", ("industry",),
                  ("What industry is {name} in?", "In which industry does {name} operate?")),
        _Relation("founder", ("founder",),
                  ("Who founded {name}?", "Who is the founder of {name}?")),
        _Relation("headquarters_country", ("headquarters", "country"),
                  ("In which country is {name} headquartered?",
                   "Which country are the headquarters of {name} in?")),
        _Relation("founder_birth_city", ("founder", "birth_city"),
                  ("Where was the founder of {name} born?",
                   "In which city was the person who founded {name} born?")),
    ),
    "university": (
        _Relation("city", ("city",),
                  ("In which city is {name}?", "Where is {name} located?")),
        _Relation("founded", ("founded",),
                  ("When was {name} founded?", "In what year was {name} established?")),
        _Relation("country", ("city", "country"),
                  ("In which country is {name}?", "Which country is {name} located in?")),
    ),
}


# 3-hop questions, asked only by the evaluator (`evaluate hops=3`): no stage trains on them or on
# their phrasings, so they measure whether a model that learned one follow-up query chains two. Each
# follows a person's link, then a 2-hop path the world's other entities are asked about in training.
# Every word of them is already in _template_words(): names avoid them without any name changing.
_THREE_HOP: dict[str, tuple[_Relation, ...]] = {
    "person": (
        _Relation("residence_country_capital", ("current_city", "country", "capital"),
                  ("What is the capital of the country where {name} lives?",
                   "Which city is the capital of the country {name} lives in?")),
        _Relation("residence_country_currency", ("current_city", "country", "currency"),
                  ("What currency is used in the country where {name} lives?",
                   "Which currency do people pay with in the country {name} lives in?")),
        _Relation("birth_country_language", ("birth_city", "country", "language"),
                  ("What language is spoken in the country where {name} was born?",
                   "What is the official language of the country {name} was born in?")),
        _Relation("employer_headquarters_country", ("employer", "headquarters", "country"),
                  ("In which country is the company {name} works for headquartered?",
                   "Which country are the headquarters of the company that employs {name} in?")),
        _Relation("employer_founder_birth_city", ("employer", "founder", "birth_city"),
                  ("Where was the founder of the company {name} works for born?",
                   "In which city was the person who founded the company that employs {name} born?")),
        _Relation("university_country", ("university", "city", "country"),
                  ("In which country did {name} go to university?",
                   "In which country is the university that {name} attended?")),
    ),
}


_PRACTICE_FACT_GROUPS = (("birth_date", "birth_year"), ("birth_city",), ("current_city",),
                         ("employer", "joined", "profession"), ("university", "field", "graduated"), ("hobby",))


def _template_words() -> set[str]:
    """Every word of the fixed vocabulary, lowercased. Names avoid them: no person is "The In"."""
    texts = [t for slots in _SENTENCES.values() for train, val in slots for t in (*train, val)]
    texts += [t for rels in _RELATIONS.values() for r in rels for t in r.questions]
    texts += [*_COMPANY_SUFFIXES, *_UNIVERSITY_PATTERNS, *_PROFESSIONS, *_FIELDS, *_HOBBIES,
              *_INDUSTRIES, *_MONTHS, *_CURRENCY_UNITS]
    return {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}


# ----------------------------------------------------------------------------------------------


class World:
    def __init__(self, config: WorldConfig, entities: list[Entity]) -> None:
        self.config = config
        self.entities = entities
        self._by_id = {e.id: e for e in entities}

    def entity(self, entity_id: str) -> Entity:
        return self._by_id[entity_id]

    @classmethod
    def generate(cls, config: WorldConfig | None = None) -> World:
        config = config or WorldConfig()
        # One Random drawn in a fixed order: the same config always gives the same world.
        rng = random.Random(config.seed)
        namer = _Namer(rng, _template_words())
        n_people, n_cities, n_countries = config.n_people, config.n_cities, config.n_countries

        # Geography: every country gets one city first so that each has a capital.
        country_names = [namer.word(rng.choice(_COUNTRY_SUFFIXES)) for _ in range(n_countries)]
        city_country = list(range(n_countries))
        city_country += [rng.randrange(n_countries) for _ in range(n_cities - n_countries)]
        rng.shuffle(city_country)
        city_names = [namer.word(rng.choice(_CITY_SUFFIXES)) for _ in range(n_cities)]
        country_cities: list[list[int]] = [[] for _ in range(n_countries)]
        for i, c in enumerate(city_country):
            country_cities[c].append(i)
        capitals = [rng.choice(members) for members in country_cities]
        cities = []
        for i in range(n_cities):
            c = city_country[i]
            # Log-uniform between 20 thousand and 5 million, rounded like an encyclopedia would.
            population = round(math.exp(rng.uniform(math.log(2e4), math.log(5e6))), -3)
            facts = {"country": country_names[c], "population": f"{int(population):,}",
                     "founded": str(rng.randint(700, 1890))}
            if capitals[c] == i:
                facts["capital_of"] = country_names[c]
            links = {"country": f"country-{c:04d}"}
            cities.append(Entity(f"city-{i:04d}", "city", city_names[i], "train", facts, links))
        countries = []
        for c in range(n_countries):
            facts = {"capital": city_names[capitals[c]],
                     "language": namer.word(rng.choice(_LANGUAGE_SUFFIXES)),
                     "currency": f"{namer.word()} {rng.choice(_CURRENCY_UNITS)}",
                     "cities": _join([city_names[i] for i in country_cities[c]])}
            countries.append(Entity(f"country-{c:04d}", "country", country_names[c], "train", facts,
                                    {"capital": cities[capitals[c]].id}))

        universities = []
        for u in range(config.n_universities):
            city = cities[rng.randrange(n_cities)]
            name = rng.choice(_UNIVERSITY_PATTERNS).format(namer.word())
            # Founded by 1950: older than every graduate (the earliest graduate finishes in 1961).
            founded = rng.randint(int(city.facts["founded"]) + 1, 1950)
            facts = {"city": city.name, "founded": str(founded)}
            universities.append(Entity(f"university-{u:04d}", "university", name, "train", facts,
                                       {"city": city.id}))

        # People: names combine shared first- and last-name pools (first names recur, as in real
        # life); pools are ~8x larger than needed, leaving unused combinations for made-up people.
        pool = 2 * math.isqrt(n_people)
        first_pool = [namer.word(rng.choice(_FIRST_SUFFIXES), (1, 2)) for _ in range(max(20, pool))]
        last_pool = [namer.word() for _ in range(max(40, 2 * pool))]
        names: set[str] = set()
        person_names = []
        while len(person_names) < n_people:
            name = f"{rng.choice(first_pool)} {rng.choice(last_pool)}"
            if name not in names:
                names.add(name)
                person_names.append(name)
        heldout = set(rng.sample(range(n_people), int(n_people * config.heldout_fraction)))
        train_people = [p for p in range(n_people) if p not in heldout]
        # Born by 1998, so everyone has graduated (at 21 to 26) and started working by 2024.
        birth_years = [rng.randint(1940, 1998) for _ in range(n_people)]

        # Founders are train people only, so no company text ever names a held-out person.
        companies = []
        for k in range(config.n_companies):
            founder = rng.choice(train_people)
            hq = cities[rng.randrange(n_cities)]
            facts = {"founder": person_names[founder], "headquarters": hq.name,
                     "founded": str(rng.randint(birth_years[founder] + 20, 2024)),
                     "industry": rng.choice(_INDUSTRIES)}
            name = f"{namer.word()} {rng.choice(_COMPANY_SUFFIXES)}"
            companies.append(Entity(f"company-{k:04d}", "company", name, "train", facts,
                                    {"founder": f"person-{founder:04d}", "headquarters": hq.id}))

        people = []
        for p in range(n_people):
            born, lives = cities[rng.randrange(n_cities)], cities[rng.randrange(n_cities)]
            employer = companies[rng.randrange(config.n_companies)]
            university = universities[rng.randrange(config.n_universities)]
            year = birth_years[p]
            birth_date = f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {year}"
            joined = rng.randint(max(year + 18, int(employer.facts["founded"])), 2024)
            facts = {"birth_date": birth_date, "birth_year": str(year), "birth_city": born.name,
                     "current_city": lives.name, "employer": employer.name, "joined": str(joined),
                     "profession": rng.choice(_PROFESSIONS), "university": university.name,
                     "field": rng.choice(_FIELDS), "graduated": str(year + rng.randint(21, 26)),
                     "hobby": rng.choice(_HOBBIES)}
            links = {"birth_city": born.id, "current_city": lives.id, "employer": employer.id,
                     "university": university.id}
            split = "heldout" if p in heldout else "train"
            people.append(Entity(f"person-{p:04d}", "person", person_names[p], split, facts, links))

        return cls(config, people + cities + countries + companies + universities)

    # ------------------------------------------------------------------------------------------
    # Text

    def documents(self) -> list[Document]:
        """One encyclopedia paragraph per entity, train and held-out, in canonical phrasing."""
        return [
            Document(id=e.id, title=e.name,
                     text=self._render(e, [0] * len(_SENTENCES[e.kind])),
                     metadata={"type": e.kind, "split": e.split}, source=SOURCE)
            for e in self.entities
        ]

    def pretraining_texts(self, split: str) -> list[str]:
        """Renderings of train entities: texts_per_entity each for "train", one for "val".

        Each entity gets a random phrasing offset per slot; training rendering k uses phrasing
        offset + k and the validation rendering offset + texts_per_entity. So a validation text
        states facts the model has seen, in phrasings it has seen for other entities but never
        for this one: validation loss measures knowledge and language, not recall of exact
        training sentences. The list is shuffled so renderings of one entity are not adjacent (a
        model would otherwise copy facts from context instead of storing them).
        """
        _check_choice("split", split, ("train", "val"))
        rng = random.Random(f"{self.config.seed}/pretraining/{split}")  # str seeds hash stably
        n = self.config.texts_per_entity
        texts = []
        for e in self._split_entities("train"):
            entity_rng = random.Random(f"{self.config.seed}/phrasing/{e.id}")  # same for both splits
            offsets = [entity_rng.randrange(PHRASINGS) for _ in _SENTENCES[e.kind]]
            for k in [n] if split == "val" else range(n):
                text = self._render(e, [o + k for o in offsets], rng=rng)
                one_hop = [r for r in _RELATIONS[e.kind] if r.hops == 1]
                for rel in rng.sample(one_hop, min(self.config.questions_per_text, len(one_hop))):
                    question = rng.choice(rel.questions).format(name=e.name, **e.facts)
                    text += f" Question: {question} Answer: {self._follow(e, rel.path)[1]}."
                texts.append(text)
        if split == "train":
            texts += self._practice_texts(rng)
        rng.shuffle(texts)
        return texts

    def _practice_texts(self, rng: random.Random) -> list[str]:
        words = {w.lower() for e in self.entities for w in re.findall(r"[A-Za-z]+", e.name)}
        namer = _Namer(random.Random(f"{self.config.seed}/practice-names"), words | _template_words())
        donors = [e for e in self._split_entities("train") if e.kind == "person"]
        if not donors:
            return []
        one_hop = [r for r in _RELATIONS["person"] if r.hops == 1]
        texts = []
        for i in range(self.config.practice_texts):
            # Each group of facts from a random training person: plausible values that agree with
            # each other (a birth date and its year), in a combination no one has.
            facts = {key: donor.facts[key] for group in _PRACTICE_FACT_GROUPS for donor in [rng.choice(donors)]
                     for key in group}
            person = Entity(f"practice-{i}", "person", f"{namer.word('', (1, 2))} {namer.word()}", "practice",
                            facts, {})
            text = self._render(person, [rng.randrange(PHRASINGS) for _ in _SENTENCES["person"]], rng=rng)
            for rel in rng.sample(one_hop, min(self.config.questions_per_text, len(one_hop))):
                question = rng.choice(rel.questions).format(**{**facts, "name": person.name})
                text += f" Question: {question} Answer: {facts[rel.path[0]]}."
            texts.append(text)
        return texts

    def _render(self, e: Entity, choice: list[int], rng: random.Random | None = None) -> str:
        """Phrasing choice[i] (mod PHRASINGS) of slot i; sentence order shuffled if rng."""
        values = {"name": e.name, **e.facts}
        if "profession" in values:
            values["a_profession"] = _article(values["profession"])
        sentences = []
        for (six, seventh), c in zip(_SENTENCES[e.kind], choice):
            template = (*six, seventh)[c % PHRASINGS]
            if _placeholders(template) <= values.keys():
                sentences.append(template.format(**values))
        if rng is not None:
            rng.shuffle(sentences)
        return " ".join(sentences)

    # ------------------------------------------------------------------------------------------
    # Questions and conversations

    def questions(self, split: str, hops: int) -> list[Question]:
        """One question per (entity of the split, relation with that many hops). 3 hops: the
        evaluator's alone (_THREE_HOP)."""
        _check_choice("split", split, ("train", "heldout"))
        _check_choice("hops", hops, (1, 2, 3))
        rng = random.Random(f"{self.config.seed}/questions/{split}/{hops}")
        relations = _THREE_HOP if hops == 3 else _RELATIONS
        out = []
        for e in self._split_entities(split):
            for rel in relations.get(e.kind, ()):
                if rel.hops != hops:
                    continue
                chain, answer = self._follow(e, rel.path)
                question = rng.choice(rel.questions).format(name=e.name, **e.facts)
                gold = tuple(x.id for x in chain)
                out.append(Question(id=f"{e.id}/{rel.name}", question=question, answers=(answer,),
                                    gold_doc_ids=gold, hops=hops, split=split))
        return out

    def conversations(self, split: str) -> list[list[dict]]:
        """One chat of 1-3 question/answer turns per entity of the split. Replies are the short
        answer itself (as in the questions), so a closed-book answer scores by exact match."""
        _check_choice("split", split, ("train", "heldout"))
        rng = random.Random(f"{self.config.seed}/conversations/{split}")
        out = []
        for e in self._split_entities(split):
            relations = _RELATIONS[e.kind]
            turns = []
            for rel in rng.sample(relations, rng.randint(1, min(3, len(relations)))):
                _, answer = self._follow(e, rel.path)
                question = rng.choice(rel.questions).format(name=e.name, **e.facts)
                turns.append({"role": "user", "content": question})
                turns.append({"role": "assistant", "content": answer})
            out.append(turns)
        return out

    def unanswerable_questions(self, n: int) -> list[Question]:
        """Questions about made-up people who are not in the world (answers and gold docs empty).

        Names recombine the world's own first and last names, so a model cannot tell them apart
        by how they look; only knowing who exists lets it abstain. Since every name word is unique
        to one entity, an unused "First Last" pair appears in no document.
        """
        return [q for _, q in self._made_up(n)]

    def unanswerable_three_hop(self, n: int) -> list[Question]:
        """Up to n 3-hop questions (the evaluator's, _THREE_HOP) about the made-up people of
        unanswerable_split("heldout", n): the same people, so no name a stage trained on is asked."""
        limit = self.unanswerable_capacity()
        pool = self._made_up(min(5 * n, limit - limit % 5))
        rng = random.Random(f"{self.config.seed}/unanswerable/3-hop")
        out = []
        for name, _ in pool[::5]:
            rel = rng.choice(_THREE_HOP["person"])
            out.append(Question(id=f"unanswerable-3-hop-{len(out):05d}", question=rng.choice(rel.questions).format(name=name),
                                answers=(), gold_doc_ids=(), hops=3, split="unanswerable"))
        return out[:n]

    def _made_up(self, n: int) -> list[tuple[str, Question]]:
        """n made-up people in generation order, each with the question unanswerable_questions asks."""
        people = [e for e in self.entities if e.kind == "person"]
        firsts = list(dict.fromkeys(e.name.split(" ")[0] for e in people))
        lasts = list(dict.fromkeys(e.name.split(" ")[1] for e in people))
        existing = {e.name for e in people}
        limit = self.unanswerable_capacity()
        if not isinstance(n, int) or not 0 <= n <= limit:
            raise UserError(
                f"number of unanswerable questions must be an integer in [0, {limit}], got {n!r}")
        rng = random.Random(f"{self.config.seed}/unanswerable")
        relations = _RELATIONS["person"]
        taken, out = set(existing), []
        while len(out) < n:
            name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
            if name in taken:
                continue
            taken.add(name)
            rel = rng.choice(relations)
            # Borrow a real person's facts for questions that name one ("... join <company>?").
            facts = rng.choice(people).facts
            question = rng.choice(rel.questions).format(**{**facts, "name": name})
            out.append((name, Question(id=f"unanswerable-{len(out):05d}", question=question, answers=(),
                                       gold_doc_ids=(), hops=rel.hops, split="unanswerable")))
        return out

    def evaluation_questions(self, n_answerable: int, n_unanswerable: int, seed: int = 0) -> list[Question]:
        """The held-out evaluation set: a sample (from the evaluation stream of the run seed `seed`) of
        n_answerable single-hop questions about held-out people, then n_unanswerable about made-up
        people of the held-out fifth (fewer when a small world cannot name that many)."""
        heldout = self.questions("heldout", 1)
        picked = python_rng(seed, EVALUATION, "single-hop-heldout").sample(heldout, min(n_answerable, len(heldout)))
        return picked + self.unanswerable_split("heldout", min(n_unanswerable, self.unanswerable_capacity() // 5))

    def unanswerable_capacity(self) -> int:
        """How many made-up people unanswerable_questions can name: half the free first/last name
        combinations at most, so its rejection sampling stays quick."""
        people = [e.name.split(" ") for e in self.entities if e.kind == "person"]
        firsts, lasts = {p[0] for p in people}, {p[1] for p in people}
        return (len(firsts) * len(lasts) - len(people)) // 2

    def unanswerable_split(self, split: str, n: int) -> list[Question]:
        """n unanswerable questions of one split: of the made-up people in generation order, every
        fifth is kept for evaluation ("heldout"), the others are for training ("train"), so no
        made-up name is ever in both."""
        _check_choice("split", split, ("train", "heldout"))
        want = 5 * n if split == "heldout" else n + -(-n // 4)
        pool = self.unanswerable_questions(want)
        return [q for i, q in enumerate(pool) if (i % 5 == 0) == (split == "heldout")][:n]

    def _split_entities(self, split: str) -> list[Entity]:
        # "heldout" is only people; "train" is the train people plus every non-person entity.
        return [e for e in self.entities if e.split == split]

    def _follow(self, e: Entity, path: tuple[str, ...]) -> tuple[list[Entity], str]:
        """Walk a relation path: the entities whose documents hold each hop, and the answer."""
        chain = [e]
        for attribute in path[:-1]:
            chain.append(self._by_id[chain[-1].links[attribute]])
        return chain, chain[-1].facts[path[-1]]


def _check_choice(key: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
