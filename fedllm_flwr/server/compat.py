"""What personalization (`personalize.*`), resuming (`resume`) and a saved starting adapter
(`init.adapter`) cannot serve, read by the config: all live on the server's side of a run
(`personalize`, `resume`, `init_adapter`)."""

from __future__ import annotations

from fedllm_flwr.compat import FED_ONLY, FT_STEPS, PRIVATE, PRIVATE_TENSORS, Conflict, is_set, not_in, one_of
from fedllm_flwr.peft_methods.compat import SINGLE_TENSOR_METHODS

RESUME = is_set("resume")
INIT_ADAPTER = is_set("init.adapter")

CONFLICTS = (
    # --- personalization: it tunes or keeps part of the federated adapter ---------------
    Conflict(PRIVATE_TENSORS, FED_ONLY,
             "partial sharing keeps part of a federated adapter local; there is no federated adapter"),
    Conflict(FT_STEPS, FED_ONLY, "FedAvg + FT tunes the federated adapter per client; there is no federated adapter"),
    Conflict(PRIVATE_TENSORS, one_of("peft", *SINGLE_TENSOR_METHODS),
             "the adapter is a single tensor: nothing would be shared"),
    # --- resuming: what lives only on the clients cannot be restored ---------------------
    Conflict(RESUME, PRIVATE,
             "the privacy state (SecAgg+'s keys, a DP-SGD site's budget) lives on the clients; "
             "restart the run instead"),
    Conflict(RESUME, PRIVATE_TENSORS,
             "the private tensors live on the clients only, and a restarted run cannot reach them"),
    Conflict(RESUME, is_set("compression.error_feedback"),
             "the clients' error-feedback residuals live on the clients only (resume with "
             "compression.error_feedback=false, or restart the run)", only_if=one_of("compression.up", "int8", "topk")),
    # --- a saved starting adapter: the server reads it into the global adapter ------------
    Conflict(INIT_ADAPTER, not_in("algorithm", "none"),
             "this algorithm builds every node's starting model from the seed, not from the global adapter"),
    Conflict(INIT_ADAPTER, PRIVATE_TENSORS,
             "private tensors start on each node from the seeded adapter, and only the server reads the file"),
    Conflict(INIT_ADAPTER, is_set("peft.client_ranks"),
             "the global adapter's rank is the largest site's, learned when the run starts"),
    Conflict(INIT_ADAPTER, one_of("peft", "p_tuning"),
             "peft saves P-tuning's prompt embeddings, not the encoder that trains them"),
)  # fmt: skip
