"""The status page in a real browser: Debian's chromium, driven by Selenium
through Debian's chromedriver (nothing is downloaded: both paths are given).

A proxy gets real traffic first, so that every section has rows: pulls by four
clients (X-Forwarded-For, behind a trusted reverse proxy) of images on two
routes, cold, warm and half-cached, a Docker Hub rate limit, and one download
held in progress by the upstream.  Then /status is rendered 390 px wide (a
phone) and 1280 px wide, light and dark; each render must have no horizontal
scroll of the page (tables scroll inside their own box), no console error
(a violation of the page's strict CSP is one), and every section heading
visible.  Screenshots go to tests/artifacts/ (gitignored).

A user logs in as one does: /status in a browser shows the login form, the
token is typed and submitted, and the session then works the page's forms
(purge, log out).  Values that come from clients are shown as text.

tests/screenshots/status-page.png, the README's picture, is made by
readme_screenshot(); every run makes one into tests/artifacts/ and checks its
size, but the committed file is rewritten only on request:

    UPDATE_SCREENSHOT=1 python -m pytest tests/test_status_browser.py

A missing chromium, chromedriver or selenium skips these tests loudly, or
fails them under CI (REQUIRE_INTEROP=1), as the interop tests do.  The last
tests feed the checks pages that are wrong on purpose.
"""

import base64
import json
import os
import shutil
import struct
import sys
import threading

import pytest

import dockerproxy
from conftest import TESTS, RegistryClient
from fakeregistry import FakeRegistry
from realregistry import wait_until
from test_cache import ACCEPT_ALL, settled

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait
except ImportError:  # pragma: no cover - depends on the machine
    webdriver = None

REQUIRED = bool(os.environ.get("REQUIRE_INTEROP"))
UPDATE_SCREENSHOT = bool(os.environ.get("UPDATE_SCREENSHOT"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

ARTIFACTS = os.path.join(TESTS, "artifacts")
README_SCREENSHOT = os.path.join(TESTS, "screenshots", "status-page.png")
MAX_SCREENSHOT_BYTES = 200 * 1024
PHONE, DESKTOP = 390, 1280
TOKEN = "status-browser-token-0123456789"

# The sections of status_page(), by id, with the heading each shows.
SECTIONS = {
    "traffic": "Traffic",
    "cache": "Cache",
    "routes": "Upstreams",
    "images": "Most pulled images, last 24 h",
    "clients": "Clients that pulled most, last 24 h",
    "pulls": f"Last {dockerproxy.RECENT_PULLS} pulls",
    "actions": "Actions",
}
# The sections whose table must have rows after the traffic below.
WITH_ROWS = ("cache", "routes", "images", "clients", "pulls")


def need_browser():
    """Skip loudly when the browser cannot be driven here; fail instead under REQUIRE_INTEROP."""
    missing = [name for name, present in (("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER),
                                          ("selenium (pip)", webdriver)) if not present]
    if missing:
        unavailable(f"{', '.join(missing)} missing")


def unavailable(reason):
    if REQUIRED:
        pytest.fail(f"REQUIRE_INTEROP is set but {reason}", pytrace=False)
    print(f"BROWSER TEST SKIPPED: {reason}", file=sys.stderr)
    pytest.skip(f"BROWSER TEST SKIPPED: {reason}")


@pytest.fixture
def browser():
    """Headless chromium with its console log kept, 1280 px wide until a test says otherwise."""
    need_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except WebDriverException as err:
        unavailable(f"chromium did not start: {err.msg}")
    try:
        yield driver
    finally:
        driver.quit()


# Traffic ###################################################################

CLIENTS = ("10.0.3.17", "10.0.3.42", "2001:db8::7", "192.168.10.5")
MiB = 1024 * 1024


def layer(name, size):
    """`size` bytes that differ for each name (each layer its own digest)."""
    seed = name.encode() + b"\n"
    return (seed * (size // len(seed) + 1))[:size]


def pull_as(proxy, address, repository, tag, prefix=""):
    """A client behind the reverse proxy pulls an image: the manifest by tag, then every blob.

    Each request is on a new connection, so the next one may be served before the
    manifest's is counted: it waits for that, as one connection would, or the page
    could name the pull by its first blob's repository, without the tag."""
    client = RegistryClient(proxy)
    forwarded = {"X-Forwarded-For": address}
    pulls = proxy.server.proxy.activity.recent
    before = len(pulls)
    status, _, body = client.request("GET", f"/v2/{prefix}{repository}/manifests/{tag}",
                                     dict(ACCEPT_ALL, **forwarded))
    assert status == 200, body
    wait_until(lambda: len(pulls) > before, what=f"the pull of {repository}:{tag} counted")
    manifest = json.loads(body)
    for digest in [manifest["config"]["digest"]] + [entry["digest"] for entry in manifest["layers"]]:
        status, _, blob = client.request("GET", f"/v2/{prefix}{repository}/blobs/{digest}", forwarded)
        assert status == 200, blob[:200]
    settled(proxy)


@pytest.fixture
def busy(start_proxy, fake):
    """A proxy as an operator sees it on a working day: two routes with images
    pulled cold, warm and half-cached by four clients, Docker Hub's rate limit,
    the cache 60% full, and one download in progress (the upstream holds it)."""
    with FakeRegistry() as ghcr:
        fake.ratelimit = ("100;w=21600", "76;w=21600")
        base = layer("debian base", 1200 * 1024)
        fake.add_image("library/alpine", "3.20", [layer("alpine", 1400 * 1024)])
        fake.add_image("library/nginx", "1.27", [base, layer("nginx", 900 * 1024)])
        fake.add_image("library/python", "3.12-slim", [base, layer("python", 1100 * 1024)])
        ghcr.add_image("acme/billing-api", "2.4.1", [layer("billing", 500 * 1024)])
        held = fake.add_pattern_blob("library/postgres", 3 * MiB, seed=5)
        proxy = start_proxy("--upstream", f"docker={fake.url}", "--upstream", f"ghcr={ghcr.url}",
                            "--cache-max-size", "8M", ADMIN_ALLOW="127.0.0.1", TRUST_PROXY_HEADERS="true")

        pull_as(proxy, CLIENTS[0], "library/alpine", "3.20")                      # miss
        pull_as(proxy, CLIENTS[1], "library/alpine", "3.20")                      # hit
        pull_as(proxy, CLIENTS[2], "library/alpine", "3.20")                      # hit
        pull_as(proxy, CLIENTS[0], "library/nginx", "1.27")                       # miss
        pull_as(proxy, CLIENTS[3], "library/python", "3.12-slim")                 # mixed: the base is cached
        pull_as(proxy, CLIENTS[1], "acme/billing-api", "2.4.1", prefix="ghcr.io/")  # miss, on ghcr
        pull_as(proxy, CLIENTS[2], "acme/billing-api", "2.4.1", prefix="ghcr.io/")  # hit
        pull_as(proxy, CLIENTS[1], "library/nginx", "1.27")                       # hit

        # A download the upstream holds after 1 MiB: "Downloads in progress" has a row.
        fake.fault("cdn", held, "stall", after_headers=True, after_bytes=MiB)
        client = RegistryClient(proxy)  # its token first: a 401 alone would be a pull on the page
        client.token = client.fetch_token({"realm": proxy.url + "/v2/auth", "service": fake.service,
                                           "scope": "repository:library/postgres:pull"})
        holder = threading.Thread(target=client.request, args=(
            "GET", f"/v2/library/postgres/blobs/{held}", {"X-Forwarded-For": CLIENTS[3]}))
        holder.start()
        try:
            wait_until(lambda: any(fill.written >= MiB // 2 for fill in proxy.cache.fills.in_flight()),
                       what="the held download in progress")
            yield proxy
        finally:
            fake.release.set()
            holder.join(30)


# Browsing ##################################################################

def set_viewport(driver, width, height=900, dark=None, scale=1):
    """The page's viewport exactly `width` x `height` CSS px (a phone's below 600 px),
    `scale` device px each; `dark`: prefers-color-scheme dark (True) or light (False)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": scale, "mobile": width < 600})
    if dark is not None:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]})


def console_entries(driver):
    """The browser's console since the last call (reading it empties it)."""
    return driver.get_log("browser")


def console_errors(driver, allowed=()):
    """SEVERE console entries (errors, CSP violations), but for messages containing one of `allowed`."""
    return [entry["message"] for entry in console_entries(driver)
            if entry["level"] == "SEVERE" and not any(text in entry["message"] for text in allowed)]


def open_status(driver, proxy, width, dark=False):
    """/status, as a browser at `width` asks for it; its console is read from here on."""
    set_viewport(driver, width, dark=dark)
    console_entries(driver)
    driver.get(proxy.url + "/status")
    assert driver.title == "dockerproxy status", driver.page_source[:500]


def follow(driver, element):
    """Click a link or a form's button, and wait until the page it leads to has loaded."""
    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    # while the old page goes, chromedriver may answer with an "unknown error" about it: ask again
    wait = WebDriverWait(driver, 10, ignored_exceptions=(WebDriverException,))
    wait.until(expected_conditions.staleness_of(old))
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")


def page_problems(driver, width, sections=SECTIONS, with_rows=WITH_ROWS, allowed=()):
    """What is wrong with the page now shown `width` px wide: a list of sentences
    (console errors containing one of `allowed` are not)."""
    problems = []
    inner, scroll = driver.execute_script(
        "return [window.innerWidth, document.documentElement.scrollWidth]")
    if inner != width:
        problems.append(f"the viewport is {inner} px wide, not {width}")
    if scroll > width:
        wide = driver.execute_script(  # the innermost elements past the edge, as tag.class
            "const past = e => e.getBoundingClientRect().right > arguments[0] + 0.5;"
            "return [...new Set(Array.from(document.querySelectorAll('body *'))"
            "  .filter(e => past(e) && !Array.from(e.children).some(past))"
            "  .map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : '')))].slice(0, 5)", width)
        problems.append(f"the page scrolls sideways: {scroll} px of content in {width} px ({', '.join(wide)})")
    problems += [f"console error: {message}" for message in console_errors(driver, allowed)]
    for section_id, heading in sections.items():
        found = driver.find_elements(By.CSS_SELECTOR, f"section#{section_id} > h2")
        if not found or not found[0].is_displayed() or found[0].text != heading:
            problems.append(f"section {section_id}: heading {heading!r} not shown"
                            + (f" (found {found[0].text!r})" if found else ""))
        elif section_id in with_rows and not driver.find_elements(
                By.CSS_SELECTOR, f"section#{section_id} table tbody tr"):
            problems.append(f"section {section_id}: no table rows")
    return problems


def png_size(data):
    """(width, height) of PNG bytes; AssertionError if they are not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def screenshot(driver, path, height=None, scale=1):
    """The page as shown (its whole height, or the first `height` CSS px), drawn
    `scale` device px per CSS px, into a PNG file; its bytes.

    The viewport is made that tall for the picture: chromium's captureBeyondViewport
    leaves parts of scrolling boxes below the viewport unpainted."""
    width, viewport, full = driver.execute_script(
        "return [window.innerWidth, window.innerHeight, document.documentElement.scrollHeight]")
    set_viewport(driver, width, min(full, height or full), scale=scale)
    try:
        data = base64.b64decode(driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})["data"])
    finally:
        set_viewport(driver, width, viewport)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(data)
    return data


README_SCALE = 0.75


def readme_screenshot(driver, proxy, path):
    """The README's picture of /status: the whole page, light, laid out 1280 px
    wide and drawn at 3/4 scale, 960 px wide (about the width a README is shown
    at, and what keeps the PNG under 200 KB); its bytes."""
    open_status(driver, proxy, DESKTOP)
    data = screenshot(driver, path, scale=README_SCALE)
    assert len(data) < MAX_SCREENSHOT_BYTES, f"{path}: {len(data)} bytes, more than {MAX_SCREENSHOT_BYTES}"
    return data


def luminance(css_color):
    """Relative luminance (WCAG) of an 'rgb(r, g, b)' or 'rgba(...)' computed colour."""
    channels = [int(float(part)) for part in css_color[css_color.index("(") + 1:-1].split(",")[:3]]
    linear = [c / 255 / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(foreground, background):
    light, dark = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


# What a text sits on: its section's card.  Selectors of text whose contrast counts.
TEXTS = ("h1", "section#traffic .card b", "header .muted", "section#routes th", "section#pulls td",
         "span.hit", "span.miss", "span.mixed", "span.ok", "header a")


def low_contrast(driver):
    """Texts under WCAG AA's 4.5:1 against the background they are drawn on."""
    found = []
    for selector in TEXTS:
        element = driver.find_element(By.CSS_SELECTOR, selector)
        colour, background = driver.execute_script(
            "let e = arguments[0], c = getComputedStyle(e).color;"
            "while (e && getComputedStyle(e).backgroundColor.match(/^rgba\\(.*, 0\\)$|transparent/))"
            "  e = e.parentElement;"
            "return [c, getComputedStyle(e || document.body).backgroundColor];", element)
        ratio = contrast(colour, background)
        if ratio < 4.5:
            found.append(f"{selector}: {colour} on {background}, {ratio:.2f}:1")
    return found


# The tests #################################################################

def test_status_page_fits_a_phone_and_a_desktop_with_no_console_error(browser, busy):
    for width in (PHONE, DESKTOP):
        open_status(browser, busy, width)
        screenshot(browser, os.path.join(ARTIFACTS, f"status-{width}.png"))
        assert page_problems(browser, width) == [], f"at {width} px"
    # the page is what the traffic made
    text = browser.find_element(By.TAG_NAME, "main").text
    for expected in ("docker.io/library/alpine:3.20", "ghcr.io/acme/billing-api:2.4.1", "2001:db8::7",
                     "76 of 100", "docker.io/library/postgres", "mixed", "hit", "miss"):
        assert expected in text, expected
    assert browser.find_element(By.CSS_SELECTOR, ".bar span").size["width"] > 0


def test_dark_mode_gives_a_dark_page(browser, busy):
    open_status(browser, busy, PHONE, dark=True)
    screenshot(browser, os.path.join(ARTIFACTS, f"status-{PHONE}-dark.png"))
    assert page_problems(browser, PHONE) == []
    body = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    card = browser.execute_script("return getComputedStyle(document.querySelector('section')).backgroundColor")
    assert luminance(body) < 0.05 and luminance(card) < 0.05, (body, card)


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_text_has_enough_contrast(browser, busy, dark):
    """WCAG AA (4.5:1) for the page's texts: headings, figures, muted notes, links, outcomes."""
    open_status(browser, busy, DESKTOP, dark=dark)
    assert low_contrast(browser) == []


def test_readme_screenshot_is_a_small_png(browser, busy):
    """The picture is made (into artifacts/) on every run; the committed one only on request."""
    made = readme_screenshot(browser, busy, os.path.join(ARTIFACTS, "status-page.png"))
    height = browser.execute_script("return document.documentElement.scrollHeight")
    width, shown = png_size(made)
    assert width == DESKTOP * README_SCALE and abs(shown - height * README_SCALE) <= 1, (width, shown, height)
    if UPDATE_SCREENSHOT:
        os.makedirs(os.path.dirname(README_SCREENSHOT), exist_ok=True)
        shutil.copyfile(os.path.join(ARTIFACTS, "status-page.png"), README_SCREENSHOT)
    assert os.path.exists(README_SCREENSHOT), \
        "no tests/screenshots/status-page.png: make it with UPDATE_SCREENSHOT=1"
    with open(README_SCREENSHOT, "rb") as file:
        committed = file.read()
    assert png_size(committed)[0] >= 800 and len(committed) < MAX_SCREENSHOT_BYTES, len(committed)


def test_a_user_logs_in_with_the_form_then_purges_and_logs_out(browser, start_proxy, fake):
    fake.add_image("library/alpine", "3.20", [b"alpine layer"])
    proxy = start_proxy("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    pull_as(proxy, "127.0.0.1", "library/alpine", "3.20")
    # The login form is served with 401, which chromium's console reports; nothing else may be there.
    own_401 = "the server responded with a status of 401"
    set_viewport(browser, PHONE)
    browser.get(proxy.url + "/status")
    assert browser.title == "dockerproxy: log in"
    assert page_problems(browser, PHONE, sections={}, allowed=(own_401,)) == []

    def log_in(token):
        field = browser.find_element(By.ID, "token")
        assert field.get_attribute("type") == "password"
        field.send_keys(token)
        follow(browser, browser.find_element(By.CSS_SELECTOR, "form[action='/admin/login'] button[type=submit]"))

    log_in("not-the-token-0123456789")
    assert browser.title == "dockerproxy: log in"
    assert browser.find_element(By.CSS_SELECTOR, "p.bad").text == "That is not the admin token."
    assert browser.get_cookie(dockerproxy.SESSION_COOKIE) is None

    log_in(TOKEN)
    assert browser.title == "dockerproxy status", (
        "the right token did not log in: " + browser.find_element(By.TAG_NAME, "body").text[:300])
    assert browser.current_url == proxy.url + "/status"
    cookie = browser.get_cookie(dockerproxy.SESSION_COOKIE)
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page_problems(browser, PHONE, with_rows=("routes", "images", "clients", "pulls"),
                         allowed=(own_401,)) == []

    # The page's forms work with the session (and their CSRF token): purge, then log out.
    assert proxy.cache.budget.objects > 0
    browser.find_element(By.ID, "image").send_keys("docker.io/library/alpine:3.20")
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form[action='/admin/purge'] button"))
    assert browser.title == "dockerproxy: purge done", browser.find_element(By.TAG_NAME, "body").text[:300]
    report = json.loads(browser.find_element(By.CSS_SELECTOR, "main p").text)
    assert report["image"] == "docker.io/library/alpine:3.20" and report["tags_removed"] == 1, report
    assert console_errors(browser) == []
    follow(browser, browser.find_element(By.LINK_TEXT, "Back to the status page"))
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form[action='/admin/logout'] button"))
    assert browser.title == "dockerproxy: log in"
    assert browser.get_cookie(dockerproxy.SESSION_COOKIE) is None
    assert console_errors(browser, (own_401,)) == []


# A client's address behind a trusted reverse proxy may be an IPv6 address with
# a zone, which Python 3.9+ accepts with nearly any characters in it.
HOSTILE_CLIENT = "fe80::1%<img src=x onerror=alert(1)>"


def test_what_clients_send_is_shown_as_text(browser, start_proxy, fake):
    fake.add_image("library/alpine", "3.20", [b"alpine layer"])
    proxy = start_proxy("--upstream", f"docker={fake.url}", ADMIN_ALLOW="127.0.0.1", TRUST_PROXY_HEADERS="true")
    pull_as(proxy, HOSTILE_CLIENT, "library/alpine", "3.20")
    shown = dockerproxy.client_address("127.0.0.1", _Headers(HOSTILE_CLIENT), True)  # 127.0.0.1 on 3.8
    open_status(browser, proxy, DESKTOP)
    assert page_problems(browser, DESKTOP, with_rows=("routes", "images", "clients", "pulls")) == []
    assert browser.find_elements(By.CSS_SELECTOR, "img, script, [onerror]") == []
    clients = [cell.text for cell in
               browser.find_elements(By.CSS_SELECTOR, "section#clients tbody td:first-child")]
    assert clients == [shown]
    pulled_by = [row.find_elements(By.TAG_NAME, "td")[1].text
                 for row in browser.find_elements(By.CSS_SELECTOR, "section#pulls tbody tr")]
    assert pulled_by == [shown]


class _Headers:
    """Just enough of an HTTPMessage for client_address()."""

    def __init__(self, forwarded):
        self.forwarded = forwarded

    def get_all(self, name):
        return [self.forwarded] if name == "x-forwarded-for" else None


# The checks, fed pages that are wrong on purpose ###########################

def test_the_checks_see_a_page_that_scrolls_sideways_breaks_its_policy_or_hides_a_section(
        browser, busy, monkeypatch):
    broken = ("@import url(http://127.0.0.1:9/theme.css);"          # refused by the CSP: a console error
              + dockerproxy.STATUS_STYLE.replace(".scroll{overflow-x:auto}", "")  # tables widen the page
              + "#clients{display:none}")
    assert ".scroll{overflow-x:auto}" in dockerproxy.STATUS_STYLE
    monkeypatch.setattr(dockerproxy, "STATUS_STYLE", broken)
    open_status(browser, busy, PHONE)
    problems = page_problems(browser, PHONE)
    # (a phone zooms out to show a page wider than itself: its viewport widens too)
    assert [problem.split(" ")[1] for problem in problems] == ["viewport", "page", "error:", "clients:"], problems
    assert "scrolls sideways" in problems[1] and "td" in problems[1]
    assert "Content Security Policy" in problems[2] and "theme.css" in problems[2]


def test_the_contrast_check_sees_grey_on_grey(browser, busy, monkeypatch):
    monkeypatch.setattr(dockerproxy, "STATUS_STYLE", dockerproxy.STATUS_STYLE + "th{color:#bbb}")
    open_status(browser, busy, DESKTOP)
    found = {problem.split(":")[0]: problem for problem in low_contrast(browser)}
    assert "section#routes th" in found and "section#pulls td" not in found, found
