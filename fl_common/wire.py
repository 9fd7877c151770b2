"""Keys of the records that travel between ServerApp and ClientApp (kebab-case).

Server and client import these names; a typo becomes an ImportError, not a silent miss.
"""

# RecordDict keys
ARRAYS = "arrays"  # the model (FedAvg's default ArrayRecord key)
CONFIG = "config"  # the round's ConfigRecord
METRICS = "metrics"  # the reply's MetricRecord

# ConfigRecord entries sent by the server
SERVER_ROUND = "server-round"  # injected by Flower's FedAvg.configure_*
RUN_CONFIG = "run-config"  # the validated RunConfig as JSON (sweeps change it per run)
RUN_TAG = "run-tag"  # unique name of the run (client state from another run is reset)

# MetricRecord entries in replies
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
VAL_LOSS = "val-loss"
VAL_ACCURACY = "val-accuracy"
VAL_ACCURACY_SQ = "val-accuracy-sq"  # its square: the weighted mean of it gives the spread
LOCAL_STEPS = "local-steps"
LOCAL_SECONDS = "local-seconds"  # wall time of the local training loop on the client

# DP replies (fl_app/privacy.py)
DP_EPSILON = "dp-epsilon"  # this client's total spend so far, at DP_DELTA
DP_DELTA = "dp-delta"
DP_NOISE = "dp-noise-multiplier"
DP_CLIP = "dp-max-grad-norm"
DP_OUT_OF_BUDGET = "dp-out-of-budget"  # error reason prefix of a client that did not train
DP_BUDGET_ERROR_CODE = 4271
DP_POLICY_REFUSED = "dp-policy-refused"  # error reason prefix: the node's own policy said no
DP_POLICY_ERROR_CODE = 4272
BASE_REFUSED = "base-refused"  # error reason prefix: no pretrained base, or another one (FedLoRA)
BASE_ERROR_CODE = 4273
# ... and the server's per-round view of them
DP_EPSILON_MAX = "dp-epsilon-max"
DP_EPSILON_MEAN = "dp-epsilon-mean"

# Node config (flower-supernode --node-config)
NODE_STATE_DIR = "state-dir"  # where a node keeps state that must survive a restart
CLIENT_STATE_DIR = "client-state-dir"  # server -> client, simulation only: the run's client-state folder
CACHE_DIR = "cache-dir"  # where a node caches its benchmark partition between messages

# Query reply: which partition a node holds
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
# ... and, for a node with its own data (node config DATA_PATH), what it holds
DATA_PATH = "data-path"  # node config: this device's parquet file or IDX folder
OWN_DATA = "own-data"  # 1 if the node trains on its own data (node config DATA_PATH)
DATA_SIZE = "data-size"  # its number of samples (training + validation)
LABEL_COUNTS = "label-counts"  # samples of each label
KEEPS_STATE = "keeps-state"  # 1 if the node keeps state across restarts (node config state-dir)
# Simulation only: no query; the server assigns each node its partition (node ids sorted,
# partition = rank) and every message it sends carries this ConfigRecord (PARTITION_ID,
# NUM_PARTITIONS). A ClientApp honours it only inside Flower's simulation engine and
# refuses a message that carries it anywhere else (fl_app/assignment.py).
ASSIGNED = "assigned-partition"
ASSIGNMENT_REFUSED = "assignment-refused"  # error reason prefix: a deployed node was sent one
ASSIGNMENT_ERROR_CODE = 4274
# Query message config: which of its own data's statistics the server asks a node for:
# "all" (size and label counts, runs without DP), "size" (sample-level DP, where the size
# of a client's data is public as the sample rate and weights reveal it), "none" (dp-mode
# user, where a client's size is private too). A node with a privacy policy sends none.
DATA_STATS = "data-stats"
DATA_STATS_LEVELS = ("all", "size", "none")

# ConfigRecord entries the server adds so that a client needs no copy of the dataset
IMAGE_SHAPE = "image-shape"  # (C, H, W) of the model's input
NUM_CLASSES = "num-classes"

# Round statistics the server adds to the aggregated train metrics
REPLIES_VALID = "replies-valid"
REPLIES_REJECTED = "replies-rejected"
REPLIES_MISSING = "replies-missing"
ROUND_AGGREGATED = "round-aggregated"  # 1 if the round's aggregate became the global model
UPLOAD_BYTES = "upload-bytes-per-client"
DOWNLOAD_BYTES = "download-bytes-per-client"
TRAIN_SECONDS = "train-seconds"
