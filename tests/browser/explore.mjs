// Drive an explorer page (`bcsfl audit report`) in headless Debian Chromium and print
// what a reader would see, as one JSON object, for tests/test_explorer_browser.py.
//
//   node tests/browser/explore.mjs PAGE.html [SCREENSHOT.png]
//
// It opens the page from disk, waits for the plots, reads each round's verify status
// (and its colour), opens the first rejected client's round and reads the reason, counts
// the stake plot's lines, and records every dialog, console error and script marker that
// a hostile page might trigger.
import { chromium } from "playwright-core";
import { pathToFileURL } from "node:url";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [page_path, screenshot] = process.argv.slice(2);
const browser = await chromium.launchPersistentContext(
  mkdtempSync(join(tmpdir(), "explorer-profile-")),
  {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1200, height: 900 },
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  },
);
const seen = { dialogs: [], errors: [], requests: [] };
try {
  const page = await browser.newPage();
  page.on("dialog", async (dialog) => { seen.dialogs.push(dialog.message()); await dialog.dismiss(); });
  page.on("console", (message) => { if (message.type() === "error") seen.errors.push(message.text()); });
  page.on("pageerror", (error) => seen.errors.push(String(error)));
  page.on("request", (request) => {
    if (!request.url().startsWith("file:")) seen.requests.push(request.url());
  });
  await page.goto(pathToFileURL(page_path).href);
  await page.waitForFunction(() => document.body.dataset.plots !== "pending", null, { timeout: 30000 });
  const facts = await page.evaluate(() => ({
    plots: document.body.dataset.plots,
    verdict: document.getElementById("verdict").textContent.trim(),
    rounds: [...document.querySelectorAll("#rounds tr[data-round]")].map((row) => {
      const status = row.querySelector("td.status");
      return {
        round: Number(row.dataset.round),
        verified: row.dataset.verified === "yes",
        status: status.textContent.trim(),
        colour: getComputedStyle(status).color,
      };
    }),
    stake_lines: document.querySelectorAll("#stake-plot g.mark-line path").length,
    stake_legend: [...document.querySelectorAll("#stake-plot g.role-legend-label text")].map((t) => t.textContent),
    standing_cells: document.querySelectorAll("#standing-plot g.mark-rect path").length,
    committee_cells: document.querySelectorAll("#committee-plot g.mark-rect path").length,
    marker: window.__explorer_marker ?? null,
  }));
  const rejected = page.locator('details.round:has(tr[data-standing="rejected"])').first();
  facts.rejected_reason = null;
  if (await rejected.count()) {
    await rejected.locator("summary").click();
    const reason = rejected.locator('tr[data-standing="rejected"] td.reason').first();
    facts.rejected_reason = { text: await reason.textContent(), visible: await reason.isVisible() };
  }
  if (screenshot) {
    await page.screenshot({ path: screenshot, fullPage: true });
  }
  facts.marker = await page.evaluate(() => window.__explorer_marker ?? null);
  console.log(JSON.stringify({ ...facts, ...seen }));
} finally {
  await browser.close();
}
