"""Generates the bundled example task: pull a person's name, age and city
out of a free-form sentence as one line of JSON. Deterministic (fixed
seed); held-out examples use names, cities and sentence patterns mixed
differently from the training ones, and no (name, age, city) triple repeats.

    python3 examples/contacts/make_data.py
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM = "Extract the person's name, age and city as JSON."

FIRST = ["Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Jonas", "Chen", "Sofia",
         "Kwame", "Elena", "Ravi", "Hannah", "Mateo", "Yuki", "Amara", "Lucas", "Ingrid", "Diego", "Nadia", "Felix",
         "Grace", "Tariq", "Mia", "Oskar", "Leila", "Samuel", "Anika", "Bruno", "Clara", "Dmitri", "Esther", "Farid",
         "Greta", "Hugo", "Isla", "Jamal", "Keiko", "Luis", "Marta", "Nikolai", "Olga", "Pablo", "Rosa", "Stefan",
         "Talia", "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zara", "Arjun", "Beatriz", "Cyrus", "Dalia", "Emil"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Fischer", "Silva", "Patel", "Baker", "Rahman", "Berg", "Wei", "Rossi",
        "Mensah", "Popescu", "Kumar", "Novak", "Garcia", "Sato", "Okafor", "Martin", "Larsen", "Torres", "Aziz",
        "Weber", "Kim", "Nasser", "Moreau", "Nilsson", "Farah", "Clarke", "Andersen", "Bianchi", "Costa", "Dubois",
        "Eriksen", "Ferreira", "Gomez", "Hoffmann", "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Murphy", "Nakamura",
        "Oliveira", "Petrov", "Quinn", "Reyes", "Schmidt", "Tran", "Ueda", "Varga", "Walsh", "Yilmaz", "Zhang",
        "Adeyemi", "Brennan", "Castillo", "Dias", "Ekstrom"]
CITIES = ["Lisbon", "Toronto", "Osaka", "Cairo", "Munich", "Santiago", "Mumbai", "Dublin", "Nairobi", "Oslo",
          "Shanghai", "Naples", "Accra", "Bucharest", "Chennai", "Prague", "Seville", "Kyoto", "Lagos", "Lyon",
          "Bergen", "Bogota", "Tunis", "Hamburg", "Seoul", "Amman", "Marseille", "Uppsala", "Mombasa", "Leeds",
          "Vienna", "Lima", "Hanoi", "Krakow", "Porto", "Denver", "Quito", "Tallinn", "Perth", "Zurich",
          "Manila", "Dakar", "Valencia", "Bristol", "Turin", "Gdansk", "Kampala", "Halifax", "Cusco", "Malmo",
          "Antwerp", "Riga", "Cordoba", "Aarhus", "Bilbao", "Graz", "Nantes", "Fukuoka", "Recife", "Adelaide"]
PATTERNS = [
    "{name}, {age}, just moved to {city}.",
    "My neighbour {name} is {age} years old and lives in {city}.",
    "Meet {name} from {city}, who turned {age} last week.",
    "{name} ({age}) works as a nurse in {city}.",
    "At {age}, {name} opened a small bakery in {city}.",
    "The new member, {name}, is {age} and comes from {city}.",
    "{city} is home to {name}, a {age}-year-old teacher.",
    "Yesterday {name} celebrated turning {age} with friends in {city}.",
    "Our guide in {city} was {name}, aged {age}.",
    "{name} is a {age} year old cyclist based in {city}.",
    "Born and raised in {city}, {name} is now {age}.",
    "Please welcome {name}, {age}, who joins us from {city}.",
]


def example(rng, patterns, names, cities):
    name = f"{rng.choice(names[0])} {rng.choice(names[1])}"
    age = rng.randint(19, 78)
    city = rng.choice(cities)
    text = rng.choice(patterns).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return (name, age, city), {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": text},
        {"role": "assistant", "content": answer},
    ]}


def main():
    rng = random.Random(20261121)
    seen = set()
    out = {"train.jsonl": [], "valid.jsonl": []}
    # Held-out: 15 first names, 15 surnames and 15 cities never seen in
    # training, so the model must copy from the sentence, not recall.
    train_names, valid_names = (FIRST[:45], LAST[:45]), (FIRST[45:], LAST[45:])
    for split, n, names, cities in [("train.jsonl", 240, train_names, CITIES[:45]), ("valid.jsonl", 60, valid_names, CITIES[45:])]:
        while len(out[split]) < n:
            key, ex = example(rng, PATTERNS, names, cities)
            if key not in seen:
                seen.add(key)
                out[split].append(ex)
    for split, rows in out.items():
        with open(os.path.join(HERE, split), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
