"""A distributed client run as its own process (inside a test's network namespace):

    python tests/swarm/probe.py P2P_ADDRESS N TOKEN [TOKEN ...]

prints one JSON line: the N greedy tokens after the prompt tokens, and the timings (route...)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distribution.p2p_loader import P2PLoader  # noqa: E402
from swarm.client import distributed_text_model, timings  # noqa: E402
from tests.swarm.conftest import greedy  # noqa: E402

address, n, prompt = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3:]]
loader = P2PLoader(address)
try:
    tm = distributed_text_model(loader)
    with tm.open_session(len(prompt) + n) as s:
        tokens = greedy(s, prompt, n)
    print(json.dumps({"tokens": tokens, **timings(tm)}))
finally:
    loader.close()
