// Drives the keygate dashboard in Debian's headless chromium (playwright-core, no bundled
// browser). Called by tests/dashboard.rs with: ADMIN_BASE ADMIN_TOKEN READ_TOKEN SHOT_DIR.
// Prints one JSON object with what the page showed; the Rust test compares it with the API.
import { chromium } from "playwright-core";

const [, , base, adminToken, readToken, shotDir] = process.argv;
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const browser = await chromium.launch({
  executablePath,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

async function signIn(page, token) {
  await page.fill("#token", token);
  // Keyboard only: Enter submits the form.
  await page.press("#token", "Enter");
}

async function teams(page) {
  return page.$$eval("#teams tr", (rows) => rows.map((r) => {
    const meter = (cls) => r.querySelector("." + cls + " [role=meter]");
    return {
      team: r.dataset.team,
      minute_used: Number(meter("minute").getAttribute("aria-valuenow")),
      minute_limit: Number(meter("minute").getAttribute("aria-valuemax")),
      day_used: Number(meter("day").getAttribute("aria-valuenow")),
      day_limit: Number(meter("day").getAttribute("aria-valuemax")),
      text: r.innerText,
    };
  }));
}

const result = { console_errors: [], expected_http_errors: [] };
// The browser logs every non-2xx fetch; the bad-token 401 is expected, anything else is not.
function consoleError(text) {
  if (/status of 401/.test(text)) result.expected_http_errors.push(text);
  else result.console_errors.push(text);
}
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") consoleError(m.text()); });
  page.on("pageerror", (e) => result.console_errors.push(String(e)));
  const response = await page.goto(base + "/dashboard");
  result.csp = response.headers()["content-security-policy"] || null;

  // A bad token shows the 401 message and no data.
  await signIn(page, "kg_prod_not_a_real_token");
  await page.waitForSelector("#error:not([hidden])");
  result.bad_token_error = (await page.textContent("#error")).trim();
  result.bad_token_content_hidden = await page.$eval("#content", (c) => c.hidden);

  // An admin token sees every team, the series and the keys.
  await signIn(page, adminToken);
  await page.waitForSelector("#content:not([hidden]) #teams tr");
  await page.waitForSelector("#keys tr");
  result.admin_teams = await teams(page);
  result.admin_series = await page.$$eval("#series figure", (f) => f.map((x) => x.dataset.team));
  result.admin_keys = await page.$$eval("#keys tr th", (t) => t.map((x) => x.textContent));
  result.storage = await page.evaluate(() => ({
    session: sessionStorage.getItem("keygate.token") !== null,
    local: localStorage.length,
  }));
  result.token_field_cleared = (await page.inputValue("#token")) === "";
  result.page_text = await page.evaluate(() => document.body.innerText);
  await page.screenshot({ path: shotDir + "/dashboard-admin-1280x800.png", fullPage: true });
  await page.setViewportSize({ width: 420, height: 900 });
  result.narrow_overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
  await page.screenshot({ path: shotDir + "/dashboard-admin-narrow.png", fullPage: true });
  await context.close();

  // A read token of one team sees only that team; the keys list needs admin.
  const readContext = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const readPage = await readContext.newPage();
  readPage.on("pageerror", (e) => result.console_errors.push(String(e)));
  readPage.on("console", (m) => { if (m.type() === "error") consoleError(m.text()); });
  await readPage.goto(base + "/dashboard");
  await signIn(readPage, readToken);
  await readPage.waitForSelector("#content:not([hidden]) #teams tr");
  await readPage.waitForSelector("#keys-note:not([hidden])");
  result.read_teams = await teams(readPage);
  result.read_series = await readPage.$$eval("#series figure", (f) => f.map((x) => x.dataset.team));
  result.read_keys_note = (await readPage.textContent("#keys-note")).trim();
  await readPage.screenshot({ path: shotDir + "/dashboard-read.png", fullPage: true });
  await readContext.close();
} catch (e) {
  result.failure = String(e && e.stack || e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
