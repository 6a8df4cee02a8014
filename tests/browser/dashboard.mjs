// Drives the dashboard at URL in headless Chromium (Debian's, through
// playwright-core from tools/browser) as a person would: it opens the page,
// answers the API-key form (first with a wrong key, then with KEY), waits for
// the page's script to fill the table, and prints what the DOM shows as JSON.
// A screenshot of the whole page goes to SHOT.
//
//   node tests/browser/dashboard.mjs URL KEY SHOT EXPECTED_ROWS
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const { chromium } = require(path.join(here, "../../tools/browser/node_modules/playwright-core"));

const [url, key, shot, expected] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const out = {};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const failed = [];
  page.on("requestfailed", (r) => failed.push(r.url()));
  const external = [];
  page.on("request", (r) => { if (!r.url().startsWith(url.replace(/\/$/, ""))) external.push(r.url()); });
  await page.goto(url, { waitUntil: "load" });
  if (key) {
    await page.waitForSelector("#keyform", { state: "visible", timeout: 10000 });
    out.keyform_first = true;
    await page.fill("#key", "not-the-key");
    await page.click("#keyform button");
    await page.waitForFunction(() => document.getElementById("keyerror").textContent.includes("refused"), null, { timeout: 10000 });
    out.wrong_key_message = await page.textContent("#keyerror");
    await page.fill("#key", key);
    await page.click("#keyform button");
  }
  await page.waitForFunction((n) => document.body.dataset.loaded === "true" && document.querySelectorAll("#rows tr").length >= n,
                             Number(expected), { timeout: 15000 });
  out.rows = await page.$$eval("#rows tr", (trs) => trs.map((tr) => ({
    cells: [...tr.querySelectorAll("td")].map((td) => td.textContent),
    read_class: tr.querySelectorAll("td")[3].className,
    data: { ...tr.dataset },
  })));
  out.text = {};
  for (const id of ["model", "context", "backend", "hitrate", "hitrate-sub", "entries", "entries-sub", "bytes", "bytes-sub", "queue", "queue-sub", "requests", "requests-sub"]) {
    out.text[id] = await page.textContent("#" + id);
  }
  out.chart_points = await page.$$eval("#chart circle", (cs) => cs.map((c) => c.getAttribute("class")));
  out.keyform_visible = await page.isVisible("#keyform");
  out.html = await page.content();
  out.external_requests = external;
  out.failed_requests = failed;
  await page.screenshot({ path: shot, fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
