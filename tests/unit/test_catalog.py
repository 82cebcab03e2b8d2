"""The shipped service catalog (blocklists/), loaded by the real loader and judged name by name.

If a case here fails, either the data changed what it blocks (fix the data, or the table with a
reason) or the loader changed how it reads the data.
"""
from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import pytest
import yaml

from resolver.loader import check_directory, load_policy
from resolver.policy import decide

BLOCKLISTS = Path(__file__).resolve().parents[2] / "blocklists"
SERVICES = sorted((BLOCKLISTS / "services").glob("*.yaml"))
NOW = 1_800_000_000.0          # any fixed time: the shipped policy has no exemptions to expire
DESKTOP = "10.1.2.3"           # group desktop: blocks whatsapp, wechat, google-drive, encrypted-dns
MOBILE = "10.2.3.4"            # group mobile: blocks nothing
SECTIONS = {"domains": "name", "hosts": "name", "patterns": "pattern", "allow": "name",
            "ip_ranges": "cidr"}
ENCRYPTED_DNS_TAGS = {"doh", "dot", "doq", "httpdns", "relay"}

# Shared infrastructure no catalog address may touch: blocking or alerting on it hits far more
# than one service (research/bypass-detection.md sections 0 and 2).
SHARED_NETWORKS = [
    ipaddress.ip_network("17.0.0.0/8"),        # Apple, incl. iCloud Private Relay ingress
    ipaddress.ip_network("172.224.0.0/16"),    # iCloud Private Relay ingress seen in DoH lists
    ipaddress.ip_network("104.16.0.0/12"),     # Cloudflare CDN front ends (cloudflare-dns.com)
]


def _load(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _entries(data: dict):
    """(section, value, entry) for every entry of a service file."""
    for section, field in SECTIONS.items():
        for entry in data.get(section) or ():
            yield section, entry.get(field) if isinstance(entry, dict) else entry, entry


@pytest.fixture(scope="module")
def policy():
    return load_policy(BLOCKLISTS)


# -- the data as files -------------------------------------------------------------------------

def test_shipped_blocklists_load_without_problems():
    problems = check_directory(BLOCKLISTS)
    assert problems == [], "\n".join(str(p) for p in problems)


def test_services_are_shipped():
    assert {p.stem for p in SERVICES} >= {"whatsapp", "wechat", "wecom", "google-drive",
                                          "google-docs", "encrypted-dns"}


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.stem)
def test_every_entry_cites_a_listed_source(path):
    data = _load(path)
    sources = data.get("sources") or {}
    assert sources, f"{path.name}: no sources"
    used = set()
    for section, value, entry in _entries(data):
        assert isinstance(entry, dict), f"{path.name}: {section} entry {entry!r} has no source"
        assert entry.get("source") in sources, \
            f"{path.name}: {section} {value!r} cites {entry.get('source')!r}, not under sources"
        used.add(entry["source"])
    assert set(sources) == used, f"{path.name}: sources nothing cites: {set(sources) - used}"


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.stem)
def test_no_name_is_listed_twice_in_a_file(path):
    seen = {}
    for section, value, _ in _entries(_load(path)):
        if section in ("domains", "hosts", "allow"):
            assert value not in seen, f"{path.name}: {value!r} in {section} and {seen[value]}"
            seen[value] = section


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.stem)
def test_ip_ranges_avoid_shared_infrastructure(path):
    for section, value, _ in _entries(_load(path)):
        if section != "ip_ranges":
            continue
        net = ipaddress.ip_network(value)
        for shared in SHARED_NETWORKS:
            assert not net.overlaps(shared), f"{path.name}: {value} overlaps {shared}"


def test_encrypted_dns_ranges_are_narrow_and_say_what_they_are():
    """Resolver addresses, not networks: a range wider than /24 or /48 must be tagged `wide`."""
    for section, value, entry in _entries(_load(BLOCKLISTS / "services" / "encrypted-dns.yaml")):
        if section != "ip_ranges":
            continue
        tags = set(entry.get("tags") or ())
        assert tags & ENCRYPTED_DNS_TAGS, \
            f"{value}: tag it with one of {sorted(ENCRYPTED_DNS_TAGS)}"
        net = ipaddress.ip_network(value)
        if net.prefixlen < (24 if net.version == 4 else 48):
            assert "wide" in tags, f"{value} is wider than /24 or /48 and not tagged wide"


def test_google_drive_has_no_ip_ranges():
    # Google: Drive's addresses "don't necessarily fall into a particular range" and are shared.
    assert not _load(BLOCKLISTS / "services" / "google-drive.yaml").get("ip_ranges")


@pytest.mark.parametrize("service", ["wecom", "google-docs"])
def test_opt_in_services_say_so(service):
    assert _load(BLOCKLISTS / "services" / f"{service}.yaml")["description"].startswith("OPT-IN.")


def test_readme_describes_every_service():
    readme = (BLOCKLISTS / "README.md").read_text(encoding="utf-8")
    for path in SERVICES:
        assert f"services/{path.name}" in readme, \
            f"blocklists/README.md does not describe {path.name}"


# -- the data as decisions ---------------------------------------------------------------------

BLOCKED_FOR_DESKTOP = [
    # WhatsApp (AdGuard list; host roles from Broadcom KB 169299, SonicWall, nDPI)
    ("web.whatsapp.com", "whatsapp"),
    ("whatsapp.com", "whatsapp"),
    ("www.whatsapp.com", "whatsapp"),
    ("g.whatsapp.net", "whatsapp"),
    ("c3.whatsapp.net", "whatsapp"),
    ("mmg.whatsapp.net", "whatsapp"),
    ("mms.whatsapp.net", "whatsapp"),
    ("media-iad3-1.cdn.whatsapp.net", "whatsapp"),
    ("wa.me", "whatsapp"),
    ("whatsapp-plus.info", "whatsapp"),
    # WeChat (AdGuard + v2fly; HTTP-DNS names from v2fly category-httpdns-cn)
    ("weixin.qq.com", "wechat"),
    ("dns.weixin.qq.com", "wechat"),
    ("dns.weixin.qq.com.cn", "wechat"),
    ("long.weixin.qq.com", "wechat"),
    ("szextshort.weixin.qq.com", "wechat"),
    ("wx.qq.com", "wechat"),
    ("web.wechat.com", "wechat"),
    ("weixinbridge.com", "wechat"),
    ("servicewechat.com", "wechat"),
    ("we.chat", "wechat"),
    ("wx.qlogo.cn", "wechat"),
    ("mp.weixin.qq.com", "wechat"),            # collateral, documented: Official-Account articles
    ("open.weixin.qq.com", "wechat"),          # collateral, documented: "Log in with WeChat"
    # Google Drive (Google's firewall list; doc-*-docs observed)
    ("drive.google.com", "google-drive"),
    ("a.drive.google.com", "google-drive"),
    ("googledrive.com", "google-drive"),
    ("drive.usercontent.google.com", "google-drive"),
    ("drive-data-export.usercontent.google.com", "google-drive"),
    ("drive-data-export-eu.usercontent.google.com", "google-drive"),
    ("doc-0s-4c-docs.googleusercontent.com", "google-drive"),
    ("doc-10-9c-docs.googleusercontent.com", "google-drive"),
    # Encrypted DNS (resolver names, not their parent companies)
    ("dns.google", "encrypted-dns"),
    ("dns64.dns.google", "encrypted-dns"),
    ("dns.google.com", "encrypted-dns"),
    ("one.one.one.one", "encrypted-dns"),
    ("cloudflare-dns.com", "encrypted-dns"),
    ("mozilla.cloudflare-dns.com", "encrypted-dns"),
    ("chrome.cloudflare-dns.com", "encrypted-dns"),
    ("dns.cloudflare.com", "encrypted-dns"),
    ("dns.quad9.net", "encrypted-dns"),
    ("doh.opendns.com", "encrypted-dns"),
    ("dns.adguard-dns.com", "encrypted-dns"),
    ("abc123.dns.nextdns.io", "encrypted-dns"),
    ("doh.pub", "encrypted-dns"),
    ("dot.pub", "encrypted-dns"),
    ("dns.alidns.com", "encrypted-dns"),
    ("doh.360.cn", "encrypted-dns"),
    ("doh.dns.apple.com", "encrypted-dns"),
    ("mask-canary.icloud.com", "encrypted-dns"),
    # the resolver's built-ins, which come with encrypted-dns
    ("use-application-dns.net", "encrypted-dns"),
    ("mask.icloud.com", "encrypted-dns"),
    ("mask-h2.icloud.com", "encrypted-dns"),
    ("_dns.resolver.arpa", "encrypted-dns"),
]

FORWARDED_FOR_DESKTOP = [
    # Google outside Drive: shared by all of Google, or the opt-in google-docs
    "google.com", "www.google.com", "mail.google.com", "accounts.google.com", "apis.google.com",
    "clients3.google.com", "lh3.google.com", "fonts.gstatic.com", "ssl.gstatic.com",
    "www.googleapis.com", "drive.googleapis.com", "lh3.googleusercontent.com",
    "googleusercontent.com", "docs.googleusercontent.com", "docs.google.com",
    "sheets.google.com", "script.google.com", "sites.google.com",
    "xdoc-0s-4c-docs.googleusercontent.com", "doc-0s-4c-docs.googleusercontent.com.example.com",
    "notdrive.google.com", "drive.google.com.example.com",
    # Tencent outside WeChat, and WeCom (carved out; opt-in service wecom)
    "qq.com", "www.qq.com", "mail.qq.com", "qpic.cn", "qlogo.cn", "thirdqq.qlogo.cn", "gtimg.cn",
    "tencent.com", "wechatpay.cn", "work.weixin.qq.com", "open.work.weixin.qq.com",
    # Meta outside WhatsApp
    "facebook.com", "www.facebook.com", "fbcdn.net", "static.xx.fbcdn.net", "instagram.com",
    "messenger.com", "meta.com", "notwhatsapp.com",
    # resolver companies' own sites
    "cloudflare.com", "www.cloudflare.com", "evilcloudflare-dns.com", "quad9.net", "opendns.com",
    "nextdns.io", "my.nextdns.io", "adguard-dns.io", "alidns.com", "google", "icloud.com",
    "www.icloud.com", "apple.com",
    "example.com",
]


@pytest.mark.parametrize("qname,service", BLOCKED_FOR_DESKTOP)
def test_desktop_blocks(policy, qname, service):
    d = decide(policy, DESKTOP, qname, NOW)
    assert (d.action, d.group, d.service) == ("block", "desktop", service), d.explain()


@pytest.mark.parametrize("qname", FORWARDED_FOR_DESKTOP)
def test_desktop_forwards(policy, qname):
    d = decide(policy, DESKTOP, qname, NOW)
    assert (d.action, d.group) == ("forward", "desktop"), d.explain()


@pytest.mark.parametrize("qname", [q for q, _ in BLOCKED_FOR_DESKTOP] + FORWARDED_FOR_DESKTOP)
def test_mobile_forwards_everything(policy, qname):
    d = decide(policy, MOBILE, qname, NOW)
    assert (d.action, d.group) == ("forward", "mobile"), d.explain()


# -- the opt-in services, in a policy that turns them on ----------------------------------------

OPT_IN_POLICY = """\
groups:
  strict:
    subnets: [10.9.0.0/16]
    block: [wechat, wecom, google-drive, google-docs]
default_group: strict
allowed_clients: [10.9.0.0/16]
"""


@pytest.fixture(scope="module")
def opt_in_policy(tmp_path_factory):
    directory = tmp_path_factory.mktemp("blocklists")
    shutil.copytree(BLOCKLISTS / "services", directory / "services")
    (directory / "policy.yaml").write_text(OPT_IN_POLICY, encoding="utf-8")
    return load_policy(directory)


@pytest.mark.parametrize("qname,action,service", [
    ("work.weixin.qq.com", "block", "wecom"),
    ("open.work.weixin.qq.com", "block", "wecom"),
    ("weixin.qq.com", "block", "wechat"),
    ("docs.google.com", "block", "google-docs"),
    ("a.c.docs.google.com", "block", "google-docs"),
    ("sheets.google.com", "block", "google-docs"),
    ("slides.google.com", "block", "google-docs"),
    ("drive.google.com", "block", "google-drive"),
    ("script.google.com", "forward", None),
    ("sites.google.com", "forward", None),
    ("google.com", "forward", None),
    ("qq.com", "forward", None),
])
def test_opt_in_services_when_turned_on(opt_in_policy, qname, action, service):
    d = decide(opt_in_policy, "10.9.0.1", qname, NOW)
    assert (d.action, d.service) == (action, service), d.explain()
