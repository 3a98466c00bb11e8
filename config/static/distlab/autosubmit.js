// Posts a form marked data-autosubmit as soon as the page loads (an LTI deep-linking
// answer goes back to the LMS); its button stays for a browser that stops scripts.
document.querySelectorAll("form[data-autosubmit]").forEach((form) => form.submit());
