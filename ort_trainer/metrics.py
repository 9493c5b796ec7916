"""Task metrics computed locally, with the formulas of the Hub's `evaluate` metric scripts (which `evaluate.load`
would download): GLUE's accuracy, F1, Matthews correlation, Pearson and Spearman correlations and MSE, and
seqeval's scores."""

import numpy as np


GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")


def glue_metrics(task_name: str | None, predictions: np.ndarray, references: np.ndarray) -> dict:
    """GLUE's metrics for `task_name`; for other data, accuracy (classification) or mean squared error
    (regression, when `predictions` are floats)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    if task_name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
    if task_name == "stsb":
        return {
            "pearson": float(pearsonr(predictions, references)[0]),
            "spearmanr": float(spearmanr(predictions, references)[0]),
        }
    if np.issubdtype(np.asarray(predictions).dtype, np.floating):
        return {"mse": float(((predictions - references) ** 2).mean())}
    accuracy = {"accuracy": float((predictions == references).mean())}
    if task_name in ("mrpc", "qqp"):
        return accuracy | {"f1": float(f1_score(y_true=references, y_pred=predictions))}
    return accuracy


def seqeval_metrics(predictions: list, references: list, entity_level: bool = False) -> dict:
    """seqeval's precision, recall, F1 and accuracy over lists of tag sequences, as the `seqeval` metric of
    `evaluate` reports them; with `entity_level`, also each entity type's numbers."""
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    results = {
        "precision": precision_score(references, predictions, zero_division=0),
        "recall": recall_score(references, predictions, zero_division=0),
        "f1": f1_score(references, predictions, zero_division=0),
        "accuracy": accuracy_score(references, predictions),
    }
    if entity_level:
        report = classification_report(references, predictions, output_dict=True, zero_division=0)
        for entity, scores in report.items():
            if entity.endswith(" avg"):
                continue
            for name in ("precision", "recall", "f1-score", "support"):
                results[f"{entity}_{name.replace('-score', '').replace('support', 'number')}"] = scores[name]
    return {key: float(value) for key, value in results.items()}


def sacrebleu_metrics(predictions: list, references: list) -> dict:
    """Corpus BLEU as the `sacrebleu` metric of `evaluate` reports its score, one reference per sentence."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}
