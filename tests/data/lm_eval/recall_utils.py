"""The recall task's score: 1 when the generation contains the answer (case-insensitive), as the Based
paper scores SWDE and FDA."""


def contains(doc, results):
    return {"contains": float(doc["answer"].strip().lower() in results[0].lower())}
