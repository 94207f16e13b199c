"""The encyclopedia's literal tables: entity types, templates, value pools, phrasings.

Pure data, no logic beyond assembling the tables: the knowledge base
(``knowledge_base``) draws values from the pools and the syllables, the documents
(``documents``) are written with the phrasings, frames, fillers and echoes, and the
questions ask for one fact each.
"""

from __future__ import annotations

TYPES = ("person", "city", "river", "mountain", "organisation")
TEMPLATES = ("article", "profile", "factsheet", "note")

# ----------------------------------------------------------------------------------
# Value pools (no pool value may appear in any template sentence; tests check this)
# ----------------------------------------------------------------------------------

OCCUPATIONS = (
    "astronomer", "cartographer", "composer", "botanist", "engineer", "glassmaker",
    "poet", "physician", "architect", "chemist", "painter", "sculptor",
    "mathematician", "navigator", "clockmaker", "weaver", "surveyor", "geologist",
    "instrument maker", "bookbinder", "playwright", "translator", "apothecary",
    "shipwright", "illustrator", "beekeeper", "lens grinder", "organ builder",
    "philologist", "engraver")
WORK_ADJECTIVES = (
    "Quiet", "Amber", "Hollow", "Distant", "Patient", "Wintry", "Narrow", "Hidden",
    "Gilded", "Restless", "Sleeping", "Crimson", "Wandering", "Second", "Northern",
    "Last", "Measured", "Folded", "Bright", "Drowned", "Seventh", "Lesser", "Borrowed",
    "Unfinished", "Pale", "Furthest", "Burning", "Humble", "Silent", "Tidal",
    "Evening", "Faithful", "Turning", "Lost", "Gentle", "Forgotten")
WORK_NOUNS = (
    "Orrery", "Harbour", "Lantern", "Meridian", "Compass", "Atlas", "Chorus",
    "Ledger", "Tide", "Clockwork", "Archive", "Almanac", "Orchard", "Lens",
    "Canticle", "Prism", "Sextant", "Tapestry", "Fugue", "Herbarium", "Threshold",
    "Beacon", "Loom", "Estuary", "Psalter", "Chronicle", "Spindle", "Kiln",
    "Astrolabe", "Pendulum", "Sonata", "Mosaic", "Register", "Furnace", "Horizon",
    "Garden")
LANDMARK_ADJECTIVES = (
    "Copper", "Marble", "Blue", "Weeping", "Red", "White", "Green", "High", "Sunken",
    "Crooked", "Golden", "Grey", "Painted", "Long", "Stone", "Black", "Twin",
    "Windy", "Old", "Broad")
LANDMARK_BUILDINGS = (
    "Gate", "Tower", "Bridge", "Market", "Cathedral", "Library", "Fountain", "Arcade",
    "Lighthouse", "Citadel", "Granary", "Theatre", "Bathhouse", "Mill", "Palace",
    "Clocktower", "Aqueduct", "Stair", "Cloister", "Belfry")
NICKNAMES = (
    "City of Bells", "City of Kites", "City of Chimneys", "City of Canals",
    "City of Spires", "City of Ferries", "City of Lamps", "City of Barrels",
    "City of Anchors", "City of Steps", "City of Arches", "City of Whistles",
    "City of Violets", "City of Ropes", "City of Scales", "City of Roses",
    "City of Masts", "City of Dovecotes", "City of Sundials", "City of Wells",
    "City of Banners", "City of Cranes", "City of Orchards", "City of Echoes",
    "Salt City", "Iron City", "Lantern City", "Brick City", "Amber City",
    "Windmill City", "Harbour City", "Silk City", "Violet City", "Owl City")
INDUSTRIES = (
    "shipbuilding", "wool weaving", "salt mining", "glassblowing", "paper making",
    "clockmaking", "printing", "tanning", "silk dyeing", "brewing", "pottery",
    "copper smelting", "lacemaking", "boatbuilding", "cheese making", "rope making",
    "bell founding", "olive pressing", "the timber trade", "the wine trade",
    "the spice trade", "horse breeding", "marble quarrying", "tea blending")
FIELDS = (
    "astronomy", "cartography", "medicine", "botany", "navigation", "mathematics",
    "architecture", "chemistry", "linguistics", "geology", "poetry", "engineering",
    "horology", "optics", "meteorology", "zoology", "philosophy", "agriculture",
    "theology", "music theory")
EMBLEM_COLOURS = ("silver", "golden", "scarlet", "black", "white", "green", "blue",
                  "grey", "amber", "violet", "crimson", "orange")
EMBLEM_ANIMALS = ("heron", "fox", "stag", "owl", "hare", "raven", "lynx", "otter",
                  "swan", "boar", "falcon", "badger", "crane", "wolf", "bear", "moth",
                  "beetle", "kingfisher", "lark", "eagle")
RIVER_FEATURES = (
    "black sand banks", "winter floods", "floating markets", "white cliffs",
    "stone weirs", "eel fisheries", "wooded islands", "roaring rapids",
    "willow groves", "painted barges", "tidal bores", "oyster beds", "reed marshes",
    "old ferry crossings", "otter colonies", "amber pebbles")
MOUNTAIN_FEATURES = (
    "hot springs", "blue glaciers", "wild goats", "crystal caves", "pilgrim paths",
    "alpine meadows", "frozen waterfalls", "hermit chapels", "old copper mines",
    "eagle nests", "twin summits", "red granite cliffs", "cloud forests",
    "snow bridges", "ancient cairns", "edelweiss slopes")
DISHES = (
    "smoked eel pie", "barley soup", "honey cakes", "salted herring",
    "plum dumplings", "saffron rice", "walnut bread", "lamb stew", "cabbage rolls",
    "spiced sausages", "almond biscuits", "onion tart", "chestnut porridge",
    "pickled mushrooms", "cherry pudding", "goat cheese pastries", "lentil broth",
    "apple fritters", "pepper crab", "buttered leeks")
MOTTO_WORDS = ("Patience", "Measure", "Light", "Courage", "Order", "Candour",
               "Diligence", "Memory", "Wonder", "Care", "Precision", "Thrift", "Honour",
               "Silence", "Craft", "Truth")
ORG_KINDS = ("Society", "Institute", "Guild", "Academy", "Circle", "Fellowship",
             "League", "Foundation", "College", "Union")

# Syllables for names: consonant onset + vowel (+ an optional final coda).
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "r", "s", "t", "v", "z", "th",
           "dr", "kr", "tr", "br", "gl", "vr", "sk", "h", "y")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou")
CODAS = ("", "", "n", "r", "l", "th", "sk", "nd", "v", "sh", "rn", "x")
# A best-effort guard against real names and words the syllables can form.
BLOCKED_NAMES = frozenset(
    "Adam Alan Anna Bella Bora Boris Dana Dara Davos Delta Dora Dubai Elena Erin "
    "Fiona Gala Garda Gena Gora Hana Hilo Kara Karen Kenya Kira Kobe Koda Lana Lara "
    "Lena Lima Linda Lisa Loma Luna Maya Mena Mila Mina Mona Nadia Nara Nina Noma "
    "Nora Rama Reno Rita Roma Rosa Sara Sela Sofia Sona Tara Tina Toga Tokyo Vera "
    "Verona Yoga Yuma Zara Zeta Tamara Samara Kirov Davor Milan Goran Sudan Boston "
    "Dakota Salem Teheran Kerala Sedona Ravenna Modena Lorena Serena Selena Rosario "
    "Gotham Baron Banner Tundra Sonar Radar Tenor Lemur Rumor Humor Vigor Bravo "
    "Gumbo Mango Tango Turbo Nylon Salon Talon Melon Demon Lemon Venom Kebab".split())


# ----------------------------------------------------------------------------------
# Templates. Placeholders: {n}/{N} the entity's name as used in prose (lower/upper
# case first letter, e.g. "the Orvessa Guild"), {s}/{S} its short form (a person's
# surname), and one placeholder per attribute ({occupation_a}/{emblem_a} add a/an).
# Prose phrasings: indices 0-1 are the article's, 2-3 the profile's, 4-5 the note's.
# ----------------------------------------------------------------------------------

PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "occupation": (
            "{n} was {occupation_a} whose work is described in several entries of "
            "this encyclopedia.",
            "By profession {n} was {occupation_a}, and {s} followed that calling for "
            "most of a working life.",
            "{S} trained as {occupation_a} and never seriously considered another "
            "calling.",
            "Those who knew {s} remembered {occupation_a} of great patience and "
            "precise habits.",
            "Readers may know {n} first of all as {occupation_a}.",
            "Our readers asked why {n}, {occupation_a} by trade, deserves a column of "
            "its own."),
        "birth_year": (
            "{n} was born in the year {birth_year}.",
            "The records give {birth_year} as the year in which {n} was born.",
            "{S} came into the world in {birth_year}, a date that {s} liked to "
            "mention in letters.",
            "The story of {s} begins in {birth_year}, the year of the birth of {n}.",
            "Archive papers confirm that {n} was born in {birth_year}.",
            "It has been a long time since {birth_year}, when {n} was born."),
        "birth_city": (
            "The birthplace of {n} was the city of {birth_city}.",
            "{n} was a native of {birth_city} and spent a childhood in its streets.",
            "{S} grew up in {birth_city}, the city where {s} had been born.",
            "The family of {s} lived in {birth_city}, and it was there that {s} was "
            "born.",
            "Visitors to {birth_city} can still find the house where {n} was born.",
            "{n} was born in {birth_city}, a fact that the city proudly advertises."),
        "mentor": (
            "As a student, {n} was taught by {mentor}.",
            "{n} trained under the guidance of {mentor}, who remained a lifelong "
            "influence.",
            "The teacher who shaped {s} most was {mentor}.",
            "Early on, {s} became the pupil of {mentor} and learned the craft at close "
            "quarters.",
            "{n} once said that everything began with lessons from {mentor}.",
            "Few remember that {n} studied under {mentor} as a young apprentice."),
        "employer": (
            "{n} was a member of the {employer} for many years.",
            "For much of a career, {n} belonged to the {employer}.",
            "{S} joined the {employer} and stayed loyal to it for decades.",
            "Membership of the {employer} gave {s} colleagues, a salary and a "
            "library.",
            "The {employer} still counts {n} among its most famous members.",
            "{n} belonged to the {employer}, which has recently opened its archives."),
        "notable_work": (
            "The best-known work of {n} is {notable_work}.",
            "{n} is chiefly remembered for the work titled {notable_work}.",
            "Of everything {s} produced, {notable_work} is the work most often cited.",
            "{S} considered {notable_work} the finest achievement of a busy career.",
            "A new edition of {notable_work}, the best-known work of {n}, is now "
            "available.",
            "{n} remains famous above all for {notable_work}."),
        "death_year": (
            "{n} died in {death_year}.",
            "The life of {n} ended in the year {death_year}.",
            "{S} died in {death_year}, mourned by friends and former students.",
            "The story of {s} closes in {death_year}, the year of the death of {n}.",
            "{n} died in {death_year}, and the anniversary is marked every year.",
            "Since the death of {n} in {death_year}, interest has only grown."),
    },
    "city": {
        "region": (
            "The province of {region} counts {n} among its cities.",
            "{n} lies in {region}, one of the provinces described in this "
            "encyclopedia.",
            "{n} belongs to the province of {region}, and its people are proud of it.",
            "The people of {n} call their province, {region}, the finest in the land.",
            "Travellers will find {n} in the province of {region}.",
            "The road to {n} crosses much of the province of {region}."),
        "founded_year": (
            "{n} was founded in {founded_year}.",
            "The city of {n} dates its founding to the year {founded_year}.",
            "According to its charter, {n} was founded in {founded_year}.",
            "Settlers founded {n} in {founded_year} on a patch of dry ground.",
            "{n} has stood since its founding in {founded_year}.",
            "Guides like to remind visitors that {n} was founded in {founded_year}."),
        "population": (
            "{n} has a population of about {population}.",
            "The last census counted {population} inhabitants in {n}.",
            "Today {n} is home to about {population} people.",
            "The population of {n} has grown to {population}.",
            "With about {population} residents, {n} is busy but rarely crowded.",
            "Some {population} people live in {n} today."),
        "river": (
            "{n} stands on the banks of the {river}.",
            "The {river} flows through the centre of {n}.",
            "{n} grew up along the {river}, which still carries boats past its walls.",
            "Life in {n} has always followed the seasons of the {river}.",
            "A walk along the {river} is the best introduction to {n}.",
            "Boats on the {river} stop at {n} several times a day."),
        "industry": (
            "The economy of {n} is known above all for {industry}.",
            "{n} is famous for {industry}.",
            "For generations the families of {n} have lived from {industry}.",
            "{n} made its fortune from {industry}, and still does.",
            "Ask anyone in {n} about {industry} and you will hear a long story.",
            "Many workshops in {n} are devoted to {industry}."),
        "landmark": (
            "The best-known landmark of {n} is the {landmark}.",
            "The {landmark} is the most famous building in {n}.",
            "Every child in {n} knows the {landmark}, the pride of the city.",
            "Citizens of {n} meet at the {landmark} on feast days.",
            "Do not leave {n} without seeing the {landmark}.",
            "The {landmark} in {n} is open to visitors most mornings."),
        "nickname": (
            "{n} is often called the {nickname}.",
            "{n} is known across the province as the {nickname}.",
            "Locals proudly call {n} the {nickname}.",
            "It is easy to see why {n} is nicknamed the {nickname}.",
            "Guidebooks call {n} the {nickname}, and the name fits.",
            "Welcome to {n}, the {nickname}."),
        "dish": (
            "The local dish of {n} is {dish}, served in every inn.",
            "No visit to {n} is complete without {dish}, the local speciality.",
            "The kitchens of {n} are proud of {dish}, the dish the city is known for.",
            "Every family in {n} has its own recipe for {dish}.",
            "Try the {dish} in any tavern of {n}; it is the local speciality.",
            "Food lovers come to {n} for its {dish}."),
    },
    "river": {
        "region": (
            "The whole course of {n} lies in the province of {region}.",
            "{N} runs through the province of {region}.",
            "Most of the course of {s} lies within the province of {region}.",
            "{S} is one of the rivers of the province of {region}.",
            "Anglers travel to {region} to fish in {n}.",
            "The province of {region} is crossed by {n}."),
        "length": (
            "{N} is {length} long.",
            "The total length of {n} is {length}.",
            "From source to mouth, {s} measures {length}.",
            "{S} travels {length} before it reaches the sea.",
            "A boat trip along all {length} of {n} takes several weeks.",
            "{N} stretches for {length}."),
        "source": (
            "{N} rises on the slopes of {source}.",
            "The source of {n} is on {source}.",
            "{S} begins as a spring high on {source}.",
            "Snowmelt from {source} feeds the first waters of {s}.",
            "Hikers can visit the source of {n} on {source}.",
            "{N} starts its journey on {source}."),
        "mouth": (
            "{N} flows into the {mouth}.",
            "The mouth of {n} opens onto the {mouth}.",
            "{S} ends its course in the {mouth}.",
            "At last {s} empties into the {mouth}.",
            "Where {n} meets the {mouth}, a wide delta has formed.",
            "Ferries cross the mouth of {n} where it enters the {mouth}."),
        "known_for": (
            "{N} is known for its {known_for}.",
            "{N} is famous for its {known_for}.",
            "{S} owes its fame to its {known_for}.",
            "Painters have long been drawn to {s} by its {known_for}.",
            "Do not miss the {known_for} of {n}.",
            "Locals insist that the {known_for} of {n} are unique."),
        "mapped_year": (
            "{N} was first mapped in {mapped_year}.",
            "The first survey of {n} was made in {mapped_year}.",
            "Surveyors charted {s} for the first time in {mapped_year}.",
            "No map showed {s} accurately until {mapped_year}.",
            "Old maps of {n} go back to {mapped_year}, when it was first surveyed.",
            "Since the first survey of {n} in {mapped_year}, its banks have changed "
            "little."),
        "bridges": (
            "{N} is crossed by {bridges} bridges along its course.",
            "Along its course, {n} is spanned by {bridges} bridges.",
            "Over the centuries people have built {bridges} bridges across {s}.",
            "{S} is crossed by {bridges} bridges, some of them very old.",
            "Count the bridges as you travel: {n} has {bridges} of them.",
            "Walkers can cross {n} on any of its {bridges} bridges."),
    },
    "mountain": {
        "region": (
            "{n} is a mountain in the province of {region}.",
            "{n} rises in the province of {region}.",
            "{S} towers over the province of {region}.",
            "Shepherds of {region} have grazed their flocks below {s} for centuries.",
            "Travellers reach {n} through the province of {region}.",
            "Hikers in {region} often choose {n} as their goal."),
        "range": (
            "{n} belongs to the {range}.",
            "{n} is one of the peaks of the {range}.",
            "{S} is part of the {range}, a chain of high summits.",
            "Among the summits of the {range}, {s} is easy to recognise.",
            "Seen from the valleys of the {range}, the peak of {n} stands out.",
            "{n} is the peak of the {range} that most visitors come to see."),
        "height": (
            "{n} reaches a height of {height}.",
            "The summit of {n} stands {height} above sea level.",
            "{S} rises to {height}.",
            "At {height}, the top of {s} is often in cloud.",
            "Climbers who reach the summit of {n} stand {height} above the sea.",
            "{n} is {height} high."),
        "first_ascent_year": (
            "The first recorded ascent of {n} took place in {first_ascent_year}.",
            "{n} was first climbed in {first_ascent_year}.",
            "Nobody stood on the summit of {s} until {first_ascent_year}.",
            "The year {first_ascent_year} saw the first ascent of {s}.",
            "It is now long since {first_ascent_year}, when {n} was first climbed.",
            "The first ascent of {n}, in {first_ascent_year}, is still celebrated "
            "locally."),
        "first_ascent_by": (
            "The first climber to reach the top of {n} was {first_ascent_by}.",
            "{n} was first climbed by {first_ascent_by}.",
            "The honour of the first ascent of {s} belongs to {first_ascent_by}.",
            "Long before the tourists, {first_ascent_by} was the first to stand on "
            "top of {s}.",
            "A plaque on {n} honours {first_ascent_by}, its first climber.",
            "Guides on {n} still tell how {first_ascent_by} first reached the "
            "summit."),
        "nearest_city": (
            "The nearest city to {n} is {nearest_city}.",
            "{n} can be seen from the city of {nearest_city}, the nearest town.",
            "Most expeditions to {s} set out from {nearest_city}, the closest city.",
            "On clear days the people of {nearest_city}, the nearest city, can see "
            "{s}.",
            "The easiest approach to {n} starts in {nearest_city}, the nearest city.",
            "Buses from {nearest_city} bring walkers to the foot of {n}."),
        "known_for": (
            "{n} is known for its {known_for}.",
            "{n} is famous for its {known_for}.",
            "{S} owes much of its fame to its {known_for}.",
            "Scientists have studied the {known_for} of {s} for many years.",
            "The {known_for} of {n} attract visitors all year.",
            "Do not miss the {known_for} of {n}."),
    },
    "organisation": {
        "field": (
            "The work of {n} is centred on {field}.",
            "{N} was created to advance the study of {field}.",
            "Its members joined {n} out of a shared passion for {field}.",
            "{N} has always put {field} at the centre of its work.",
            "{N}, which promotes {field}, has announced a new season of lectures.",
            "Anyone interested in {field} will know the name of {n}."),
        "founded_year": (
            "{N} was founded in {founded_year}.",
            "The year {founded_year} saw the founding of {n}.",
            "{N} held its first meeting in {founded_year}.",
            "Since {founded_year}, when it was founded, {n} has met without "
            "interruption.",
            "{N} celebrates its founding in {founded_year} each year.",
            "Records show that {n} was established in {founded_year}."),
        "founder": (
            "{N} was founded by {founder}.",
            "The founder of {n} was {founder}.",
            "It was {founder} who gathered the first members of {n}.",
            "{N} owes its existence to {founder}, its founder.",
            "A portrait of {founder}, the founder of {n}, hangs in its hall.",
            "Members of {n} still honour {founder} as its founder."),
        "hq_city": (
            "{N} has its headquarters in {hq_city}.",
            "The seat of {n} is in the city of {hq_city}.",
            "{N} meets in its hall in {hq_city}, where it has its headquarters.",
            "The headquarters of {n} have always been in {hq_city}.",
            "Visitors to {hq_city} can tour the headquarters of {n}.",
            "{N}, based in {hq_city}, welcomes new members."),
        "members": (
            "{N} has about {members} members.",
            "The membership of {n} numbers some {members}.",
            "Today {n} counts {members} members.",
            "With {members} members, {n} is larger than ever.",
            "Some {members} members belong to {n} at present.",
            "{N} reports a membership of {members}."),
        "emblem": (
            "The emblem of {n} is {emblem_a}.",
            "{N} uses {emblem_a} as its emblem.",
            "The members of {n} wear badges showing {emblem_a}, the emblem they "
            "share.",
            "{N} chose {emblem_a} as its emblem.",
            "Look for {emblem_a}, the emblem of {n}, above the door.",
            "The flag of {n} shows {emblem_a}, its emblem."),
        "motto": (
            "The motto of {n} is \"{motto}\".",
            "{N} has taken \"{motto}\" as its motto.",
            "From its first year, {n} has lived by the motto \"{motto}\".",
            "The words \"{motto}\" have served {n} as a motto since its early days.",
            "The motto \"{motto}\" was printed on every invitation sent by {n}.",
            "{N} reminded its members of its motto, \"{motto}\"."),
    },
}
STYLE_VARIANTS = {"article": (0, 1), "profile": (2, 3), "note": (4, 5)}

# Fact sheet lines: a frame around (label, value as written in the sheet).
FACTSHEET_FRAMES = (
    "The {label} of {n} is {value}.",
    "Entry for {n}, {label}: {value}.",
    "Under {label}, the record for {n} lists {value}.",
    "As for the {label} of {n}, it is {value}.",
)
FACTSHEET: dict[str, dict[str, tuple[str, str]]] = {
    "person": {
        "occupation": ("occupation", "{occupation}"),
        "birth_year": ("year of birth", "{birth_year}"),
        "birth_city": ("place of birth", "{birth_city}"),
        "mentor": ("teacher", "{mentor}"),
        "employer": ("affiliation", "the {employer}"),
        "notable_work": ("best-known work", "{notable_work}"),
        "death_year": ("year of death", "{death_year}"),
    },
    "city": {
        "region": ("province", "{region}"),
        "founded_year": ("year of founding", "{founded_year}"),
        "population": ("population", "{population}"),
        "river": ("river", "the {river}"),
        "industry": ("main industry", "{industry}"),
        "landmark": ("best-known landmark", "the {landmark}"),
        "nickname": ("nickname", "the {nickname}"),
        "dish": ("local dish", "{dish}"),
    },
    "river": {
        "region": ("province", "{region}"),
        "length": ("length", "{length}"),
        "source": ("source", "{source}"),
        "mouth": ("mouth", "the {mouth}"),
        "known_for": ("best-known feature", "its {known_for}"),
        "mapped_year": ("year first mapped", "{mapped_year}"),
        "bridges": ("number of bridges", "{bridges}"),
    },
    "mountain": {
        "region": ("province", "{region}"),
        "range": ("mountain range", "the {range}"),
        "height": ("height", "{height}"),
        "first_ascent_year": ("year of first ascent", "{first_ascent_year}"),
        "first_ascent_by": ("first climber", "{first_ascent_by}"),
        "nearest_city": ("nearest city", "{nearest_city}"),
        "known_for": ("best-known feature", "its {known_for}"),
    },
    "organisation": {
        "field": ("field", "{field}"),
        "founded_year": ("year of founding", "{founded_year}"),
        "founder": ("founder", "{founder}"),
        "hq_city": ("headquarters", "{hq_city}"),
        "members": ("number of members", "{members}"),
        "emblem": ("emblem", "{emblem_a}"),
        "motto": ("motto", "\"{motto}\""),
    },
}
# Attribute order of each style (the note shuffles; the fact sheet sorts by label).
ARTICLE_ORDER = {t: tuple(PHRASES[t]) for t in TYPES}
PROFILE_ORDER = {
    "person": ("birth_year", "birth_city", "mentor", "occupation", "employer",
               "notable_work", "death_year"),
    "city": ("founded_year", "river", "region", "industry", "dish", "nickname",
             "landmark", "population"),
    "river": ("source", "region", "known_for", "length", "bridges", "mouth",
              "mapped_year"),
    "mountain": ("range", "region", "nearest_city", "height", "known_for",
                 "first_ascent_year", "first_ascent_by"),
    "organisation": ("founded_year", "founder", "hq_city", "field", "motto", "emblem",
                     "members"),
}
# The article opens like an encyclopedia entry: a lead sentence with key facts.
LEADS = {
    "person": ("{N}, born in {birth_city} in {birth_year}, was {occupation_a} who died "
               "in {death_year}.",
               "{N} was {occupation_a} from {birth_city}, who lived from {birth_year} "
               "to {death_year}."),
    "city": ("{N} is a city of {region} that stands on the {river}.",
             "{N} is a city on the {river}, in the province of {region}."),
    "river": ("{N} is a river of {region} that flows into the {mouth}.",
              "{N} is a river of {region} that rises on {source}."),
    "mountain": ("{N} is a mountain of the {range}, {height} high.",
                 "{N} is a peak of {height} in the province of {region}."),
    "organisation": ("{N} is an organisation devoted to {field}, founded in "
                     "{founded_year}.",
                     "{N} is an organisation based in {hq_city} and devoted to "
                     "{field}."),
}


def _frames(kind: str) -> dict[str, tuple[tuple[str, str], tuple[str, str]]]:
  """(intros, closings) per style for one kind of entity (`kind` as it reads in prose)."""
  return {
      "article": (
          (f"{{N}} is {kind} described in this encyclopedia; this entry collects its "
           "principal facts.",
           "This article gives an overview of what is known about {n}."),
          ("Further details about {n} can be found in the related entries of this "
           "encyclopedia.",
           "The entries on the places and people connected with {n} give more "
           "background.")),
      "profile": (
          ("A short portrait of {n} follows, told in the order in which its story is "
           "usually recounted.",
           f"Every {kind.split()[-1]} has a character, and {{n}} has more than most."),
          ("That, in brief, is the story of {n}.",
           "So ends this short portrait of {n}.")),
      "factsheet": (
          ("Fact sheet for {n}, compiled from the standard reference entries.",
           "The following fact sheet lists the key data about {n}, one item per "
           "line."),
          ("End of the fact sheet for {n}.",
           "This completes the list of key data for {n}.")),
  }


FRAMES: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "person": {
        **_frames("a person"),
        "article": (
            ("{N} is the subject of this encyclopedia entry, which brings together the "
             "main facts of a well-documented life.",
             "This entry summarises what is known about {n}, drawing on the standard "
             "reference works."),
            ("Further details about {n} can be found in the related entries of this "
             "encyclopedia.",
             "The entries on the places and societies connected with {n} give more "
             "background.")),
        "profile": (
            ("A short profile of {n} follows, told in the order in which the events of "
             "the life are usually recounted.",
             "Few lives are as easy to sketch in a few lines as that of {n}."),
            ("That, in brief, is the story of {n}.",
             "So ends this short portrait of {n}.")),
        "note": (
            ("This week our column on remarkable lives turns to {n}.",
             "Notes from the reading room: a reader has asked us about {n}."),
            ("Readers with more to say about {n} are invited to write to the editors.",
             "More about {n} may follow in a later column.")),
    },
    "city": {
        **_frames("a city"),
        "note": (
            ("Travel notes: a first visit to the city of {n}.",
             "Our travel guide this month takes you to {n}."),
            ("Allow at least two days to enjoy {n} properly.",
             "Whatever the season, {n} rewards a visit.")),
    },
    "river": {
        **_frames("a river"),
        "note": (
            ("Travel notes: a journey along {n}.",
             "Our travel guide this month follows {n} downstream."),
            ("Pack waterproof boots for any trip along {n}.",
             "Whatever the season, {n} rewards a visit.")),
    },
    "mountain": {
        **_frames("a mountain"),
        "note": (
            ("Travel notes: a walking trip to {n}.",
             "Our travel guide this month climbs {n}."),
            ("Bring warm clothes for any trip to {n}.",
             "Whatever the season, {n} rewards a visit.")),
    },
    "organisation": {
        **_frames("an organisation"),
        "note": (
            ("News in brief: {n} has been in the news again this month.",
             "Our correspondent reports on {n}."),
            ("{N} says that more announcements will follow.",
             "Further news from {n} is expected soon.")),
    },
}
# Name-bearing sentences without facts, added until a document is long enough.
FILLERS = {
    "person": (
        "Letters written by {n} survive in several private collections.",
        "Historians still discuss the character of {n} with some affection.",
        "A small portrait of {n} hangs in a reading room open to the public.",
        "Little is recorded about the daily habits of {n}, but much about the work.",
        "Students are often asked to write essays about {n}.",
        "The name of {n} appears in many catalogues and indexes.",
        "Anecdotes about {n} were collected by friends and printed after a long "
        "delay.",
        "Several streets have been named in honour of {n}."),
    "city": (
        "The markets of {n} are busy from early morning.",
        "Old photographs of {n} show narrow lanes and crowded quays.",
        "Many writers have described the evening light over {n}.",
        "The streets of {n} are paved with worn grey stone.",
        "Festivals in {n} fill the squares with crowds and stalls.",
        "The old quarter of {n} is best explored on foot.",
        "Visitors often remark on the friendliness of the people of {n}.",
        "The archives of {n} hold records going back many generations."),
    "river": (
        "The water of {n} is cold even in summer.",
        "Fishermen on {n} tell stories about its moods.",
        "Old bridges cross {n} at several points.",
        "In spring {n} runs high and fast.",
        "Poets of the region have written many verses about {n}.",
        "The banks of {n} are lined with alders and tall grass.",
        "Mills once stood along {n}, though few remain.",
        "Boatmen know every bend of {n}."),
    "mountain": (
        "Snow lingers on the upper slopes of {n} until early summer.",
        "Weather on {n} changes quickly.",
        "Paths on {n} are marked with painted stones.",
        "The view from {n} is said to reach far across the plain.",
        "Shepherds' huts are scattered over the lower slopes of {n}.",
        "Many climbers remember their first sight of {n}.",
        "Storms gather around the summit of {n} on summer afternoons.",
        "The forests below {n} are full of birds."),
    "organisation": (
        "The library of {n} is open to scholars by appointment.",
        "Meetings of {n} are known for long and lively debates.",
        "The annual dinner of {n} is a popular event.",
        "Minutes of the meetings of {n} have been kept since the beginning.",
        "A small museum run by {n} displays its collections.",
        "{N} publishes a yearly report on its activities.",
        "Young people are encouraged to join {n}.",
        "Lectures organised by {n} are open to all."),
}
# Sentences that repeat one of the entity's facts in passing (no new facts).
ECHOES = {
    "person": (
        "In {birth_city}, the name of {n} is still well known.",
        "Copies of {notable_work} by {n} are kept in many libraries.",
        "The {employer} keeps a small room in memory of {n}.",
        "As {occupation_a}, {n} was respected by colleagues.",
        "Among the pupils of {mentor}, {n} is the one most often mentioned."),
    "city": (
        "From the bridges of {n} one can watch the {river} flow past.",
        "Photographs of the {landmark} have made {n} known far away.",
        "Visitors to {n} often take home a recipe for {dish}.",
        "The workshops of {n} have kept {industry} alive for centuries."),
    "river": (
        "Climbers on {source} can see the first streams of {n}.",
        "Ships from the {mouth} sometimes sail up {n}.",
        "Photographs of the {known_for} of {n} appear in many books.",
        "{N} is a familiar sight to the people of {region}."),
    "mountain": (
        "From the squares of {nearest_city}, {n} is a familiar sight.",
        "Maps of the {range} show {n} clearly.",
        "Photographs of the {known_for} of {n} appear in many books.",
        "The boots worn by {first_ascent_by} on {n} are kept in a museum."),
    "organisation": (
        "The building of {n} is a familiar sight in {hq_city}.",
        "Letters from {n} are sealed with {emblem_a}.",
        "Lectures at {n} often end with its motto, \"{motto}\".",
        "Scholars of {field} often visit the library of {n}."),
}
QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "occupation": ("What was the occupation of {n}?", "What did {n} do for a living?",
                       "What profession did {n} follow?"),
        "birth_year": ("In what year was {n} born?", "When was {n} born?",
                       "What is the year of birth of {n}?"),
        "birth_city": ("In which city was {n} born?", "Where was {n} born?",
                       "What is the birthplace of {n}?"),
        "mentor": ("Who was the teacher of {n}?", "Under whom did {n} study?",
                   "Who taught {n}?"),
        "employer": ("Which organisation was {n} a member of?",
                     "To which body did {n} belong?",
                     "Which institution did {n} belong to?"),
        "notable_work": ("What is the best-known work of {n}?",
                         "For which work is {n} best remembered?",
                         "What is the title of the most famous work of {n}?"),
        "death_year": ("In what year did {n} die?", "When did {n} die?",
                       "What is the year of death of {n}?"),
    },
    "city": {
        "region": ("In which province is {n}?", "Which province does {n} lie in?",
                   "In what province is the city of {n} located?"),
        "founded_year": ("When was {n} founded?", "In what year was {n} founded?",
                         "What is the founding year of {n}?"),
        "population": ("What is the population of {n}?", "How many people live in {n}?",
                       "How many inhabitants does {n} have?"),
        "river": ("On which river does {n} stand?", "Which river flows through {n}?",
                  "What river is {n} built on?"),
        "industry": ("What industry is {n} known for?", "What is the main industry of {n}?",
                     "For which trade is {n} famous?"),
        "landmark": ("What is the best-known landmark of {n}?",
                     "Which building is the most famous landmark of {n}?",
                     "What landmark is {n} famous for?"),
        "nickname": ("What is the nickname of {n}?", "What is {n} often called?",
                     "By what nickname is {n} known?"),
        "dish": ("What is the local dish of {n}?", "Which dish is {n} known for?",
                 "What speciality should visitors eat in {n}?"),
    },
    "river": {
        "region": ("Through which province does {n} flow?", "In which province is {n}?",
                   "Which province does {n} run through?"),
        "length": ("How long is {n}?", "What is the length of {n}?",
                   "How many kilometres long is {n}?"),
        "source": ("On which mountain does {n} rise?", "Where is the source of {n}?",
                   "Which mountain is the source of {n}?"),
        "mouth": ("Into which sea does {n} flow?", "Where does {n} end?",
                  "What sea is at the mouth of {n}?"),
        "known_for": ("What is {n} known for?", "What is {n} famous for?",
                      "For what is {n} best known?"),
        "mapped_year": ("When was {n} first mapped?", "In what year was {n} first surveyed?",
                        "What year was {n} first charted?"),
        "bridges": ("How many bridges cross {n}?", "How many bridges span {n}?",
                    "What is the number of bridges over {n}?"),
    },
    "mountain": {
        "region": ("In which province is {n}?", "Which province is {n} in?",
                   "In what province does {n} rise?"),
        "range": ("To which mountain range does {n} belong?", "Which range is {n} part of?",
                  "What range includes {n}?"),
        "height": ("How high is {n}?", "What is the height of {n}?", "How tall is {n}?"),
        "first_ascent_year": ("When was {n} first climbed?",
                              "In what year was the first ascent of {n}?",
                              "What year did someone first reach the summit of {n}?"),
        "first_ascent_by": ("Who first climbed {n}?", "Who made the first ascent of {n}?",
                            "Who was the first person to reach the top of {n}?"),
        "nearest_city": ("What is the nearest city to {n}?", "Which city is closest to {n}?",
                         "From which city do most expeditions to {n} start?"),
        "known_for": ("What is {n} known for?", "What is {n} famous for?",
                      "For what is {n} best known?"),
    },
    "organisation": {
        "field": ("What field is {n} devoted to?", "What does {n} study?",
                  "Which subject does {n} promote?"),
        "founded_year": ("When was {n} founded?", "In what year was {n} founded?",
                         "What is the founding year of {n}?"),
        "founder": ("Who founded {n}?", "Who was the founder of {n}?",
                    "Who established {n}?"),
        "hq_city": ("Where is {n} based?", "In which city are the headquarters of {n}?",
                    "Which city is home to {n}?"),
        "members": ("How many members does {n} have?", "What is the membership of {n}?",
                    "How large is the membership of {n}?"),
        "emblem": ("What is the emblem of {n}?", "What does the emblem of {n} show?",
                   "Which emblem does {n} use?"),
        "motto": ("What is the motto of {n}?", "Which motto does {n} use?",
                  "What words serve as the motto of {n}?"),
    },
}
# Attributes a knowledge update may change (no year constraints hang on them).
UPDATABLE = {
    "person": ("birth_city", "occupation", "notable_work", "employer"),
    "city": ("region", "population", "river", "industry", "landmark", "nickname",
             "dish"),
    "river": ("region", "length", "source", "mouth", "known_for", "bridges"),
    "mountain": ("region", "range", "height", "nearest_city", "known_for"),
    "organisation": ("field", "hq_city", "members", "emblem", "motto"),
}
# Attributes rendered with a/an: an update keeps the article.
ARTICLE_ATTRS = ("occupation", "emblem")

