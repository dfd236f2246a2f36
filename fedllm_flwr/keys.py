"""Every key our messages and a node's state use, in one place.

Both ends of a message read these: the ServerApp's strategies write them, the
ClientApp's node (`fedllm_flwr.node`) reads them, and the other way round for
replies. Where Flower defines a key, it is Flower's constant, not a copy.
Light on purpose (no ML stack): the warm-up and the ClientApp's module import it.
"""

from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

# --- Records of an adapter message (`fedllm_flwr.transport`) ---------------------
ARRAYS_KEY = "arrays"
"""ArrayRecord holding the packed adapter (and a codec's side arrays)."""
PACKED_KEY = "adapter"
"""The encoded values inside ARRAYS_KEY; a codec may add arrays beside it (int8 `scales`, top-k `indices`)."""
MANIFEST_KEY = "adapter-manifest"
"""ConfigRecord: tensor names and shapes in packing order, the codec, RELATIVE_KEY."""
RELATIVE_KEY = "relative"
"""In the manifest: 1 when the values are an update relative to what the sender was sent."""
EMULATOR_FILES_KEY = "emulator-files"
"""FedOT: ArrayRecord of the emulator folder's files (uint8 arrays), on a node's first message."""
MERGED_KEY = "merged-lora"
"""strategy=stacking: ArrayRecord of the parts of the merged LoRA delta this node has not
got yet, keyed "<round>/<module>/<A|B|w|rounds>" (`fedllm_flwr.lora_stacks`: a round's
stack, or a compaction that replaces the rounds it lists); the node keeps what it holds
under the same key in its state."""

ZO_STEPS_KEY = "zo-steps"
"""algorithm=zo: ArrayRecord of the rounds' aggregated steps this node has not applied:
int64 `rounds` and `indices` (into the seed pool) and float64 `coefficients`, in order."""
ZO_REPLY_KEY = "zo-reply"
"""algorithm=zo: a reply's ArrayRecord of int64 `indices` and float64 `coefficients`
(per seed index, the sum of lr * g over the round's steps that drew it)."""
ZO_POOL_KEY = "zo-pool"
"""algorithm=zo: in the "config" records both ways, the seed pool's fingerprint."""
ZO_WEIGHTS_KEY = "zo-weights"
"""algorithm=zo: in a message's "config", the fingerprint of the global weights the server
holds (the adapter's tensors; zo.params=full: the base weights). A node whose weights
differ after applying the message's steps refuses it (z drawn differently there)."""
ROUNDS_HELD_KEY = "rounds-held"
"""stacking, algorithm=zo: in a message's "config", how many rounds' stacks (in every
module, a compaction counting the rounds it covers) or steps the global model holds;
a node that holds another number after the message refuses it (a lost state would
otherwise go unnoticed and train on the wrong model)."""

# --- Keys of a train message's "config" ConfigRecord ------------------------------
SERVER_ROUND_KEY = "server-round"
"""The round, as Flower's FedAvg writes it (Flower spells it out and exports no constant)."""
DATA_KEY = "data"
"""scenario=global: "all" tells the one training node to use every partition's data."""
STEPS_KEY = "local-steps"
"""Overrides train.local_steps for this round."""
PERSONALIZE_KEY = "personalize"
"""1 after the last round: FedAvg + FT, tune and score before and after."""
RUN_NAME_KEY = "run-name"
"""With PERSONALIZE_KEY: the run folder's name, where a node keeps a personalized adapter
that may not leave it (`Config.personalized_stays_on_nodes`)."""
EMULATOR_ID_KEY = "fedot-emulator"
"""FedOT: the fingerprint of the emulator the node trains on."""
CLIPPING_NORM_KEY = KEY_CLIPPING_NORM
"""privacy=dp: Flower's client-side clipping wrapper sends the norm under its own key."""

# --- Keys of a query message's "config" ------------------------------------------
WARM_UP_KEY = "warm-up"
"""1: load the model and this client's data now, reply when done (simulation only)."""

# --- Keys of replies --------------------------------------------------------------
SUM_KEY = "secagg-clients"
"""privacy=secagg: on the unmasked aggregate, how many clients' updates it sums."""

# --- A node's own state (Flower's context.state), kept between its messages ------
PRIVATE_KEY = "private-adapter"
"""This node's unshared adapter tensors (personalize.private)."""
FEEDBACK_KEY = "error-feedback"
"""What lossy uplink compression left out of this node's updates so far."""
ZO_STATE_KEY = "zo-adapter"
"""algorithm=zo: this node's copy of the global adapter."""
ZO_ROUND_KEY = "zo-round"
"""algorithm=zo: ConfigRecord with the last round whose steps that copy has applied
(`round`) and how many rounds' steps it has applied (`count`)."""
DP_LEDGER_KEY = "dp-sgd-ledger"
"""privacy=dp_sgd: a site's DP-SGD history in its `context.state` (`privacy.ledger.DpLedger`)."""
SAT_OUT_KEY = "sat-out"
"""A training reply's metric: 1 when the site declined the round (privacy=dp_sgd: it would
pass `privacy.target_epsilon`); such a reply carries no update and is counted, not averaged."""
