"""The handshake decision alone (core/handshake.decide), in the source tree named by argv[1]:

    .venv/bin/python bench/handshake/decide.py .  ;  .venv/bin/python bench/handshake/decide.py ../main

a granted request named by its code (three per-device items) and a refused one (no item covers the
product), and the refusal's message; medians of 5 runs of the best of 3 x 20,000 calls, in microseconds.
Run trees alternately, side by side, on this shared machine."""
import sys, timeit, statistics
sys.path.insert(0, sys.argv[1])
from datetime import datetime, timedelta, UTC
from lts_server.core import handshake as hs
from lts_server.core.model import Item, ItemStatus, HandshakeCode, DeploymentType, LicenseType, Period
NOW = datetime(2026, 12, 1, tzinfo=UTC)
items = {f"i{n}": Item(item_id=f"i{n}", license_id="L", organization_id="216998", product="reader",
         deployment_type=DeploymentType.BROWSER, license_type=LicenseType.PER_DEVICE, quantity=10**9,
         starts_at=NOW - timedelta(days=30), expires_at=NOW + timedelta(days=300 + n), period=Period.YEARLY)
         for n in range(3)}
code = HandshakeCode(name="216998-c", organization_id="216998", items=tuple(items))
class V:
    codes = {code.name: code}
    def __init__(self): self.items = items
    def default_code(self, o): return code.name
    def default_codes(self, o): return [code.name]
    def organization_known(self, o): return True
    def status(self, i): return ItemStatus()
    def seat_expiry(self, i, c): return None
    def instances_elsewhere(self, i, c, now): return 0
    def share(self, i, c):  # trees with seat reservations (issue 25) ask for the code's share: none here
        from lts_server.core.reservations import FREE
        return FREE
v = V()
ok = hs.Request(client_uuid="d", product="reader", deployment_type=DeploymentType.BROWSER, handshake_code="216998-c")
bad = hs.Request(client_uuid="d", product="other", deployment_type=DeploymentType.BROWSER, handshake_code="216998-c")
pw = lambda c, g: True
for name, r in (("granted", ok), ("refused", bad)):
    runs = [min(timeit.repeat(lambda: hs.decide(r, v, NOW, pw), number=20000, repeat=3)) / 20000 * 1e6 for _ in range(5)]
    extra = ""
    if name == "refused":
        d = hs.decide(r, v, NOW, pw)
        runs2 = [min(timeit.repeat(lambda: d.refusal.message, number=20000, repeat=3)) / 20000 * 1e6 for _ in range(5)]
        extra = f" message {statistics.median(runs2):.2f} us"
    print(f"{sys.argv[1]} {name}: decide {statistics.median(runs):.2f} us{extra}")
